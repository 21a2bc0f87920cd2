#!/usr/bin/env python
"""Stage 1: train a KL-VAE. Example: python train_vae.py --config configs/vae/shapes_cpu.yaml"""
from ldm.cli import train_vae_main

if __name__ == "__main__":
    train_vae_main()
