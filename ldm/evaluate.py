"""Prompt adherence on `shapes`: generate for fixed prompts, read the images back, score.

The analyzer (`ldm.data.shapes.analyze`) recovers colour, shape, size, position and background
from a picture; comparing them with the attributes the prompt asked for gives per-attribute
accuracy, a direct measure of whether a text-to-image model follows its prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm.data import shapes
from ldm.data.images import image_grid
from ldm.infer import Pipeline, generate


def prompt_adherence(pipe: Pipeline, n: int = 64, seed: int = 0, exclude=(), out_dir: str | Path | None = None,
                     **sampling) -> dict:
    """Accuracy per attribute over `n` balanced single-object prompts (one image each).

    `sampling` goes to `ldm.infer.generate` (scheduler, steps, guidance_scale, batch_size...).
    With `out_dir`, writes `adherence.json` and `adherence-grid.png` (prompt order).
    """
    prompts = shapes.eval_prompts(n, seed=seed, exclude=exclude)
    texts = [text for text, _ in prompts]
    results = generate(pipe, texts, seeds=[seed * 100_000 + i for i in range(n)], **sampling)
    images = [r["image"] for r in results]
    scores = shapes.score(images, [scene for _, scene in prompts])
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        image_grid(images, nrow=8).save(out_dir / "adherence-grid.png")
        record = {"n": n, "scores": scores, "prompts": texts,
                  "sampling": {k: v for k, v in sampling.items() if isinstance(v, (int, float, str))}}
        (out_dir / "adherence.json").write_text(json.dumps(record, indent=2))
    return scores


def format_scores(scores: dict) -> str:
    order = ["color", "position", "shape", "size", "background", "all"]
    return "  ".join(f"{k} {scores[k]:.0%}" for k in order if k in scores)
