#!/usr/bin/env python
"""Does a VAE code an object's colour apart from its background? (issue #23, docs/composition.md)

    python bench/latent_locality.py runs/demo/vae/vae
    python bench/latent_locality.py runs/demo/vae/vae --size small --json out.json

Not a speed benchmark. A U-Net that has seen green objects and black backgrounds, but never the two
together, can draw green on black only if the latent of green on black is one it can put together
from what it saw. This encodes a square of each `shapes` colour, centred, on each background, and
compares the mean latent of the 2x2 cells at the square's centre:

- per colour, the distance between its code on black and on gray (near 0: the code is local);
- the spread of the six colours' codes on black (the scale those distances compare with);
- for one colour on one background (default green on black), the nearest codes among the others,
  and how far the additive guess lands from it: its code on gray plus the mean black-minus-gray
  shift of the other colours.

Distances are in the VAE's raw latent units; `scaling_factor` (the stored one) converts them to the
units the U-Net sees, and `relative` (the held-out colour's black-vs-gray distance over the spread)
compares VAEs of different scales. Deterministic (the posterior means), a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.shapes import BACKGROUNDS, COLORS, Scene, ShapeObject, render  # noqa: E402
from ldm.models.vae import latent_scale, load_vae  # noqa: E402


@torch.no_grad()
def centre_codes(vae, size: str = "large", resolution: int = 32) -> dict[tuple[str, str], torch.Tensor]:
    """{(colour, background): the flattened posterior mean of the 2x2 latent cells at the centre}."""
    codes = {}
    for color in COLORS:
        for background in BACKGROUNDS:
            image = render(Scene(background, (ShapeObject("square", color, size, "center"),)), resolution)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            z = vae.encode(x).latent_dist.mean[0]
            h, w = z.shape[-2:]
            codes[color, background] = z[:, h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1].flatten()
    return codes


def locality(codes: dict[tuple[str, str], torch.Tensor], color: str = "green", background: str = "black",
             reference: str = "gray") -> dict:
    def dist(a, b):
        return round(float((a - b).norm()), 2)

    target = codes[color, background]
    others = [c for c in COLORS if c != color]
    shift = torch.stack([codes[c, background] - codes[c, reference] for c in others]).mean(0)
    nearest = sorted((dist(z, target), f"{c} on {b}") for (c, b), z in codes.items() if (c, b) != (color, background))
    spread = float(torch.stack([codes[c, background] for c in COLORS]).std(0).norm())
    return {
        f"{background}_vs_{reference}": {c: dist(codes[c, background], codes[c, reference]) for c in COLORS},
        f"spread_on_{background}": round(spread, 2),
        "relative": round(float((target - codes[color, reference]).norm()) / spread, 2),
        "held_out": f"{color} on {background}",
        "nearest": nearest[:4],
        "additive_miss": dist(codes[color, reference] + shift, target),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vae", help="an AutoencoderKL directory (a stage-1 export: <out_dir>/vae)")
    p.add_argument("--size", choices=["large", "small"], default="large")
    p.add_argument("--color", default="green")
    p.add_argument("--background", default="black")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    vae = load_vae(args.vae).eval()
    result = {"vae": args.vae, "size": args.size, "scaling_factor": round(latent_scale(vae)[0], 4),
              **locality(centre_codes(vae, args.size), args.color, args.background)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
