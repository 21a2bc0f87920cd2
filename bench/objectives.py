#!/usr/bin/env python
"""Epsilon, v and flow at the demo's budget: prompt adherence at 20, 8 and 4 sampling steps.

    python bench/objectives.py --demo runs/demo --out runs/objectives    # after `python demo.py`
    python bench/objectives.py --demo /tmp/d --out /tmp/o --steps 20 --n 8   # a quick run
    python bench/objectives.py --demo runs/emoji_cpu --preset emoji_cpu --data runs/data/emoji-64 --out runs/objectives-emoji

Not a speed benchmark: it measures what issue #20 asks of the objectives. It takes the demo's
CLIP, VAE and latent cache (`python demo.py` makes them) and trains one U-Net per objective with
configs/ldm/<preset>.yaml, changing only the noise section (the demo's own U-Net, <demo>/ldm, stands
for the objective it was trained with):

    eps    noise.prediction_type=epsilon, the scaled-linear DDPM schedule, min-SNR 5
    v      noise.prediction_type=v_prediction (Salimans & Ho 2022), the same DDPM schedule and min-SNR
    flow   noise.objective=flow (rectified flow, SD3: logit-normal t, no shift)
    flow-uniform   the same with t ~ U[0, 1] (--objectives flow-uniform; not in the default set)

Same seed, steps, batch, learning rate and data order for all three. Each exported pipeline is
sampled for --n balanced prompts (`ldm.evaluate.prompt_adherence`, seed 0, guidance 4) with the
objective's second-order multistep solver (DPM-Solver++(2M): `dpm++2m` for eps and v,
`flow-dpm++2m` for flow) at each of --sample-steps, and the shapes analyzer scores colour,
shape, size, position and background per image. Re-running resumes and skips finished U-Nets.

On real images (--preset NAME for configs/ldm/NAME.yaml, --data FOLDER: a prepared image folder such as
`python -m ldm.data.prepare emoji` writes), each pipeline is scored as issue #19 scores a run instead:
`ldm.evaluate.evaluate_pipeline` on the first --n held-out images and their captions, FID and KID
against them (with the real-vs-real floor), caption retrieval (with the real images' ceiling), in the
features of the demo's CLIP (--features to name another network).
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
DDPM = "beta_schedule: scaled_linear, snr_gamma: 5.0"  # the CPU presets' schedule and min-SNR weighting
OBJECTIVES = {  # name: (the noise section, sampler)
    "eps": ([f"noise={{prediction_type: epsilon, {DDPM}}}"], "dpm++2m"),
    "v": ([f"noise={{prediction_type: v_prediction, {DDPM}}}"], "dpm++2m"),
    "flow": (["noise={objective: flow}"], "flow-dpm++2m"),
    "flow-uniform": (["noise={objective: flow, timestep_sampling: uniform}"], "flow-dpm++2m"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", required=True, help="a `python demo.py` run directory (clip/, vae/, latents/, ldm/)")
    p.add_argument("--preset", default="shapes_cpu", help="the stage-3 config: configs/ldm/PRESET.yaml")
    p.add_argument("--data", help="a prepared image folder: score FID/KID/retrieval on its held-out images "
                   "instead of the shapes analyzer")
    p.add_argument("--features", help="with --data: the feature network (default: clip:<demo>/clip)")
    p.add_argument("--cache", help="the latent cache (default: <demo>/latents)")
    p.add_argument("--out", required=True, help="where the U-Nets and figures.json go")
    p.add_argument("--objectives", nargs="+", default=["eps", "v", "flow"], choices=list(OBJECTIVES))
    p.add_argument("--steps", type=int, help="train.steps of every U-Net (warm-up a tenth of it); default: the config's")
    p.add_argument("--sample-steps", type=int, nargs="+", default=[20, 8, 4])
    p.add_argument("--n", type=int, help="prompts scored per U-Net and step count (default: 128; 200 held-out with --data)")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--json", help="also write the figures to this file (they always go to <out>/figures.json)")
    args = p.parse_args(argv)
    args.n = args.n or (200 if args.data else 128)
    return args


def unet_dir(args, name: str) -> Path:
    """The demo's own U-Net stands for the objective it was trained with, when trained with the same step count."""
    own = Path(args.demo) / "ldm"
    if args.steps is None and (own / "pipeline" / "model_index.json").exists() and objective_of_run(own) == name:
        return own
    return Path(args.out) / f"ldm-{name}"


def objective_of_run(run: Path) -> str:
    """eps, v, flow or flow-uniform: what the run's resolved config.yaml trained (the names of OBJECTIVES)."""
    import yaml

    noise = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("noise", {})
    if noise.get("objective") == "flow":
        return "flow-uniform" if noise.get("timestep_sampling") == "uniform" else "flow"
    return "v" if noise.get("prediction_type") == "v_prediction" else "eps"


def main(argv=None) -> dict:
    from ldm.demo import run_stage
    from ldm.infer import load_pipeline
    from ldm.train.ldm import LDMTrainConfig, train_ldm

    args = parse_args(argv)
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "figures.json").read_text()) if (out / "figures.json").exists() else {}
    timings = dict(previous.get("wall_s", {}))
    train = [f"train.steps={args.steps}", f"train.warmup_steps={args.steps // 10}"] if args.steps else []

    figures = {"n": args.n, "guidance_scale": args.guidance_scale, "objectives": {}}
    score = HeldOutQuality(args) if args.data else AnalyzerScores(args)
    figures["measure"] = score.measure
    for name in args.objectives:
        noise, sampler = OBJECTIVES[name]
        ldm_dir = unet_dir(args, name)
        # important: the U-Nets differ in the noise section alone (same seed, steps, data order)
        cfg = load_config(LDMTrainConfig, CONFIGS / "ldm" / f"{args.preset}.yaml",
                          [f"out_dir={ldm_dir}", f"cache={args.cache or demo / 'latents'}", f"vae={demo / 'vae' / 'vae'}",
                           f"text.encoder={demo / 'clip'}", "validation.quality_n=0", *noise, *train])
        run_stage(timings, f"ldm_{name}", ldm_dir / "pipeline" / "model_index.json", lambda: train_ldm(cfg))
        pipe = load_pipeline(ldm_dir / "pipeline")
        rows = {}
        for steps in args.sample_steps:
            t0 = time.time()
            rows[steps] = {**score(pipe, name, sampler, steps), "sample_s": round(time.time() - t0, 1)}
        figures["objectives"][name] = {"sampler": sampler, "unet": str(ldm_dir), "scores": rows}
    figures["wall_s"] = timings

    table = ["objective | " + " | ".join(f"{s} steps ({score.columns})" for s in args.sample_steps)]
    for name, row in figures["objectives"].items():
        table.append(f"{name} | " + " | ".join(score.cell(row["scores"][s]) for s in args.sample_steps))
    report(figures, "\n".join(table), str(out / "figures.json"))
    if args.json:
        Path(args.json).write_text((out / "figures.json").read_text())
    return figures


class AnalyzerScores:
    """The shapes analyzer's scores of --n balanced prompts (seed 0)."""

    measure = "shapes analyzer: colour, shape, size, position, background and all five right"
    columns = "all five / shape"

    def __init__(self, args):
        self.args = args

    def __call__(self, pipe, name: str, sampler: str, steps: int) -> dict:
        from ldm.evaluate import format_scores, prompt_adherence

        scores = prompt_adherence(pipe, n=self.args.n, out_dir=Path(self.args.out) / f"adherence-{name}-{steps}",
                                  scheduler=sampler, steps=steps, guidance_scale=self.args.guidance_scale,
                                  batch_size=32)
        print(f"{name} ({sampler}, {steps} steps): {format_scores(scores)}")
        return {k: scores[k] for k in ORDER}

    @staticmethod
    def cell(row: dict) -> str:
        return f"{row['all']:.0%} / {row['shape']:.0%}"


class HeldOutQuality:
    """FID, KID and caption retrieval on the first --n held-out images of --data (ldm.evaluate), the
    same images, captions and seeds for every objective."""

    columns = "FID / top-1"

    def __init__(self, args):
        self.args = args
        self.features = args.features or f"clip:{Path(args.demo) / 'clip'}"
        self.measure = (f"FID, KID and caption retrieval on {args.n} held-out images of {args.data}, "
                        f"features {self.features}")
        self.data = None  # the folder's data config, at the first pipeline's size (all train on the same latents)

    def __call__(self, pipe, name: str, sampler: str, steps: int) -> dict:
        from ldm.evaluate import evaluate_pipeline, folder_data

        if self.data is None:
            self.data = folder_data(self.args.data, pipe.native_size, self.args.n)
        record = evaluate_pipeline(pipe, self.data, self.features, n=self.args.n,
                                   out_dir=Path(self.args.out) / f"quality-{name}-{steps}", scheduler=sampler,
                                   steps=steps, guidance_scale=self.args.guidance_scale)
        return record["quality"]

    @staticmethod
    def cell(row: dict) -> str:
        return f"{row['fid']:.1f} / {row['top1']:.0%}"


if __name__ == "__main__":
    main()
