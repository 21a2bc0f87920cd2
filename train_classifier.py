#!/usr/bin/env python
"""Train the noise-aware classifier of classifier guidance. Example:
python train_classifier.py --config configs/classifier/shapes_cpu.yaml"""
from ldm.cli import train_classifier_main

if __name__ == "__main__":
    train_classifier_main()
