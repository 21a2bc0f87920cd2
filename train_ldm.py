#!/usr/bin/env python
"""Stage 3: train the text-conditioned U-Net. Example: python train_ldm.py --config configs/ldm/shapes_cpu.yaml"""
from ldm.cli import train_ldm_main

if __name__ == "__main__":
    train_ldm_main()
