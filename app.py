#!/usr/bin/env python
"""Web demo on a trained pipeline. Example: python app.py runs/demo/ldm --port 7860 (see ldm/app.py)."""
from ldm.app import main

if __name__ == "__main__":
    main()
