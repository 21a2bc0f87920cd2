#!/usr/bin/env python
"""The main job: all three stages on the embedded `shapes` dataset, then a scored sample grid."""
from ldm.demo import main

if __name__ == "__main__":
    main()
