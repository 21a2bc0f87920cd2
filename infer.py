#!/usr/bin/env python
"""Text-to-image, img2img, inpainting. Example: python infer.py runs/demo/ldm/pipeline --prompt 'a large red circle'"""
from ldm.cli import infer_main

if __name__ == "__main__":
    infer_main()
