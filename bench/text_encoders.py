#!/usr/bin/env python
"""Prompt adherence of a U-Net conditioned on our trained CLIP text tower vs a random frozen one.

    python bench/text_encoders.py --out runs/text_encoders              # the CPU demo configs (~40 min, one core)
    python bench/text_encoders.py --out /tmp/te --steps 20 --n 8        # a quick run: every stage, few steps

Not a speed benchmark: it measures what issue #6 asks of a trained text encoder. On the embedded
`shapes` dataset it trains one CLIP (configs/clip/shapes_cpu.yaml) and one VAE
(configs/vae/shapes_cpu.yaml), encodes two latent caches (configs/encode/shapes_cpu.yaml; the
latents are the same, the cached text embeddings differ), and trains two U-Nets
(configs/ldm/shapes_cpu.yaml) that differ only in `text.encoder`:

    random   the `tiny` preset: a CLIP text encoder randomly initialised and frozen
    trained  the text tower of the CLIP trained here (`text.encoder=<out>/clip`)

Same seed, steps and data for both. Each exported pipeline is then sampled for --n balanced
prompts (`ldm.evaluate.prompt_adherence`, the configs' validation sampler settings) and the
shapes analyzer scores colour, shape, size, position and background per image. Also reported:
the CLIP's held-out retrieval (top-1/top-5 among 100 image-caption pairs) and each stage's wall
time. Re-running the same command resumes an interrupted stage and skips finished ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from bench.common import report  # noqa: E402

from ldm.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ORDER = ("color", "shape", "size", "position", "background", "all")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory (clip/, vae/, latents-*/, ldm-*/, figures.json)")
    p.add_argument("--steps", type=int, help="train.steps of every stage (CLIP, VAE, both U-Nets), warm-up a tenth of "
                                             "it; default: each config's own")
    p.add_argument("--n", type=int, default=128, help="prompts scored per U-Net")
    p.add_argument("--data-size", type=int, help="shapes images of every stage (data.source.size); default: the configs'")
    p.add_argument("--json", help="also write the figures to this file (they always go to <out>/figures.json)")
    return p.parse_args(argv)


def _overrides(args) -> tuple[list[str], list[str]]:
    """(train.* overrides, data.* overrides) from --steps and --data-size."""
    train = [f"train.steps={args.steps}", f"train.warmup_steps={args.steps // 10}"] if args.steps else []
    return train, [f"data.source.size={args.data_size}"] if args.data_size else []


def main(argv=None) -> dict:
    from ldm.train.encode import EncodeConfig, encode_dataset
    from ldm.demo import run_stage
    from ldm.evaluate import format_scores, prompt_adherence
    from ldm.infer import load_pipeline
    from ldm.train.clip import ClipTrainConfig, train_clip
    from ldm.train.ldm import LDMTrainConfig, train_ldm
    from ldm.train.vae import VAETrainConfig, train_vae

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "figures.json").read_text()) if (out / "figures.json").exists() else {}
    timings = dict(previous.get("wall_s", {}))
    train, data = _overrides(args)

    clip_dir, vae_dir = out / "clip", out / "vae"
    clip_cfg = load_config(ClipTrainConfig, CONFIGS / "clip" / "shapes_cpu.yaml",
                           [f"out_dir={clip_dir}", *train, *data])
    run_stage(timings, "clip", clip_dir / "eval.json", lambda: train_clip(clip_cfg))
    vae_cfg = load_config(VAETrainConfig, CONFIGS / "vae" / "shapes_cpu.yaml",
                          [f"out_dir={vae_dir}", *train, *data])
    run_stage(timings, "vae", vae_dir / "vae" / "config.json", lambda: train_vae(vae_cfg))

    encoders = {"random": "tiny", "trained": str(clip_dir)}
    figures = {"n": args.n, "encoders": encoders, "clip_retrieval": json.loads((clip_dir / "eval.json").read_text())}
    for name, encoder in encoders.items():
        cache_dir, ldm_dir = out / f"latents-{name}", out / f"ldm-{name}"
        enc_cfg = load_config(EncodeConfig, CONFIGS / "encode" / "shapes_cpu.yaml",
                              [f"vae={vae_dir / 'vae'}", f"out_dir={cache_dir}", f"text.encoder={encoder}", *data])
        run_stage(timings, f"encode_{name}", cache_dir / "manifest.json", lambda: encode_dataset(enc_cfg))
        # important: the two U-Nets differ in text.encoder alone (same seed, steps, data order)
        ldm_cfg = load_config(LDMTrainConfig, CONFIGS / "ldm" / "shapes_cpu.yaml",
                              [f"out_dir={ldm_dir}", f"cache={cache_dir}", f"vae={vae_dir / 'vae'}",
                               f"text.encoder={encoder}", *train])
        run_stage(timings, f"ldm_{name}", ldm_dir / "pipeline" / "model_index.json", lambda: train_ldm(ldm_cfg))

        t0 = time.time()
        val = ldm_cfg.validation
        sampling = dict(scheduler=val.scheduler, steps=val.steps, guidance_scale=val.guidance_scale, batch_size=32)
        scores = prompt_adherence(load_pipeline(ldm_dir / "pipeline"), n=args.n, out_dir=ldm_dir / "adherence", **sampling)
        timings[f"sample_score_{name}"] = round(time.time() - t0, 1)
        figures[name] = {k: scores[k] for k in ORDER}
        print(f"{name} ({encoder}): {format_scores(scores)}")
    figures["sampling"] = sampling
    figures["wall_s"] = timings

    retrieval = figures["clip_retrieval"]
    summary = (f"trained - random, all attributes right: {figures['trained']['all'] - figures['random']['all']:+.1%} "
               f"over {args.n} prompts; CLIP retrieval among {retrieval['candidates']}: "
               f"top-1 {retrieval['t2i_top1']:.0%} (text->image) / {retrieval['i2t_top1']:.0%} (image->text), "
               f"top-5 {retrieval['t2i_top5']:.0%} / {retrieval['i2t_top5']:.0%}")
    report(figures, summary, str(out / "figures.json"))
    if args.json:
        Path(args.json).write_text((out / "figures.json").read_text())
    return figures


if __name__ == "__main__":
    main()
