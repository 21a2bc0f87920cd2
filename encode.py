#!/usr/bin/env python
"""Stage 2: encode a dataset to a latent cache. Example: python encode.py --config configs/encode/shapes_cpu.yaml"""
from ldm.cli import encode_main

if __name__ == "__main__":
    encode_main()
