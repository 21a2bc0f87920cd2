#!/usr/bin/env python
"""Latent consistency distillation of a trained pipeline into a 1-4 step sampler (LCM).
Example: python distill.py --config configs/distill/shapes_cpu.yaml"""
from ldm.cli import distill_main

if __name__ == "__main__":
    distill_main()
