"""Prompt adherence on `shapes`: generate for fixed prompts, read the images back, score.

The analyzer (`ldm.data.shapes.analyze`) recovers colour, shape, size, position and background
from a picture; comparing them with the attributes the prompt asked for gives per-attribute
accuracy, a direct measure of whether a text-to-image model follows its prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ldm.data import shapes
from ldm.data.images import image_grid
from ldm.infer import Pipeline, generate


def prompt_adherence(pipe: Pipeline, n: int = 64, seed: int = 0, exclude=(), out_dir: str | Path | None = None,
                     **sampling) -> dict:
    """Accuracy per attribute over `n` balanced single-object prompts (one image each).

    `sampling` goes to `ldm.infer.generate` (scheduler, steps, guidance_scale, batch_size...).
    With `out_dir`, writes `adherence.json` (with the scores of small and large objects apart)
    and `adherence-grid.png` (prompt order).
    """
    prompts = shapes.eval_prompts(n, seed=seed, exclude=exclude)
    texts = [text for text, _ in prompts]
    results = generate(pipe, texts, seeds=[seed * 100_000 + i for i in range(n)], **sampling)
    images = [r["image"] for r in results]
    by_size = scores_by_size(images, [scene for _, scene in prompts])
    scores = by_size["all"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        image_grid(images, nrow=8).save(out_dir / "adherence-grid.png")
        record = {"n": n, "scores": scores, "by_size": {k: v for k, v in by_size.items() if k != "all"}, "prompts": texts,
                  "sampling": {k: v for k, v in sampling.items() if isinstance(v, (int, float, str))}}
        (out_dir / "adherence.json").write_text(json.dumps(record, indent=2))
    return scores


def scores_by_size(images, scenes) -> dict[str, dict[str, float]]:
    """`shapes.score` over all single-object images, and over the small and the large ones apart:
    a small shape is a few pixels across, so its shape is what a model gets wrong first."""
    images, scenes = list(images), list(scenes)
    result = {"all": shapes.score(images, scenes)}
    for size in shapes.SIZES:
        chosen = [i for i, scene in enumerate(scenes) if scene.objects[0].size == size]
        if chosen:
            result[size] = shapes.score([images[i] for i in chosen], [scenes[i] for i in chosen])
    return result


@torch.no_grad()
def reconstruction_adherence(vae, resolution: int, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """What the analyzer reads back from a VAE's reconstructions of every single-object scene.

    This is the ceiling of prompt adherence for any U-Net trained on that VAE's latents: a shape
    the decoder cannot draw from a clean latent (the posterior mode), it cannot draw from a
    generated one. Returns `scores_by_size` of the 720 reconstructions.
    """
    scenes = shapes.all_single_object_scenes()
    device, dtype = vae.device, vae.dtype
    images = []
    for start in range(0, len(scenes), batch_size):
        pixels = np.stack([np.asarray(shapes.render(s, resolution)) for s in scenes[start:start + batch_size]])
        x = torch.from_numpy(pixels).to(device, dtype).permute(0, 3, 1, 2) / 127.5 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        images += list(((recon.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return scores_by_size(images, scenes)


def format_scores(scores: dict) -> str:
    order = ["color", "position", "shape", "size", "background", "all"]
    return "  ".join(f"{k} {scores[k]:.0%}" for k in order if k in scores)
