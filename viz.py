#!/usr/bin/env python
"""Diffusion made visible. Example: python viz.py schedules --out schedules.png (see ldm/viz.py)."""
from ldm.viz import main

if __name__ == "__main__":
    main()
