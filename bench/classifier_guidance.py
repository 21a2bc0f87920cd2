#!/usr/bin/env python
"""Classifier guidance against classifier-free guidance over classes, on the shapes demo (issue #22).

On the demo's latent cache, VAE and CLIP (read-only), with one training budget for both U-Nets:
  (a) an unconditional U-Net: caption_dropout=1.0, so it always sees the empty prompt;
  (b) a class-conditional U-Net: labels=shapes:shape (4 classes), label_dropout=0.1, empty prompt too;
  (c) the noise-aware classifier of the shape, on the same latents and noise schedule.
Then `n` images per setting, class i % 4 from seed i, scored by the shapes analyzer (the shape it
reads back against the class asked for): (a) with classifier guidance at each --scales, (b) with
classifier-free guidance over classes at each --cfg (1: the conditional model alone), and, with
--text-model, a text-conditioned pipeline (the demo's) at CFG 4 with and without classifier guidance.
Writes <out>/guidance.json, <out>/adherence.png and <out>/classifier/accuracy.png; a run that exists is reused.

    python bench/classifier_guidance.py --demo /work/main/runs/demo --out runs/cg --steps 400
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from ldm.config import load_config
from ldm.data import shapes
from ldm.infer import generate, load_pipeline
from ldm.models.classifier import load_classifier
from ldm.data.cache import vae_identity
from ldm.train.classifier import ClassifierTrainConfig, train_classifier
from ldm.train.ldm import LDMTrainConfig, train_ldm

CLASSES = list(shapes.SHAPES)


def train_unets(args) -> dict[str, Path]:
    demo = Path(args.demo)
    common = [f"cache={demo / 'latents'}", f"vae={demo / 'vae' / 'vae'}", f"text.encoder={args.text_encoder or demo / 'clip'}",
              "caption_dropout=1.0", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
              f"train.warmup_steps={max(args.steps // 10, 1)}", "train.eval_every=0", "train.save_every=0",
              "train.log_every=50", "validation.prompts=[]", "validation.quality_n=0", "fast.compile=false",
              "fast.channels_last=false"]
    runs = {"unconditional": [], "class-conditional": ["labels=shapes:shape", "label_dropout=0.1"]}
    out = {}
    for name, extra in runs.items():
        run = Path(args.out) / ("uncond" if name == "unconditional" else "classcond")
        if not (run / "pipeline" / "ldm.json").is_file():
            cfg = load_config(LDMTrainConfig, args.ldm_config or demo / "ldm" / "config.yaml", [f"out_dir={run}", *common, *extra])
            t0 = time.time()
            train_ldm(cfg)
            print(f"{name}: trained in {time.time() - t0:.0f} s")
        out[name] = run / "pipeline"
    run = Path(args.out) / "classifier"
    if not (run / "classifier" / "classifier.json").is_file():
        cfg = load_config(ClassifierTrainConfig, None, [
            f"out_dir={run}", f"cache={demo / 'latents'}", f"vae={demo / 'vae' / 'vae'}", "labels=shapes:shape",
            f"train.steps={args.classifier_steps}", f"train.batch_size={args.batch}", "train.lr=1e-3",
            "train.lr_schedule=cosine", f"train.warmup_steps={max(args.classifier_steps // 20, 1)}", "train.log_every=50", "train.eval_every=0",
            "eval_batches=4"])
        train_classifier(cfg)
    out["classifier"] = run / "classifier"
    return out


def shape_accuracy(images, wanted: list[str]) -> dict:
    """The fraction of images whose one object the analyzer reads as the wanted shape (with a normal
    95% interval, +-1.96 sqrt(p(1-p)/n)), and the fraction in which it finds an object at all."""
    found = [shapes.analyze(image, num_objects=1)["objects"] for image in images]
    p = sum(bool(f) and f[0]["shape"] == w for f, w in zip(found, wanted)) / len(wanted)
    half = 1.96 * (p * (1 - p) / len(wanted)) ** 0.5
    return {"shape_accuracy": p, "ci95": [round(max(p - half, 0), 3), round(min(p + half, 1), 3)],
            "object_found": sum(bool(f) for f in found) / len(wanted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo's run dir (latents/, vae/, clip/, ldm/)")
    parser.add_argument("--out", default="runs/classifier_guidance")
    parser.add_argument("--ldm-config", default="", help="the U-Nets' stage-3 config (default: the demo's ldm/config.yaml)")
    parser.add_argument("--text-encoder", default="", help="text.encoder of the U-Nets (default: the demo's clip/)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of each U-Net and of the classifier")
    parser.add_argument("--classifier-steps", type=int, default=2000, help="training steps of the classifier "
                        "(a step costs about a sixth of a U-Net step)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, default=128, help="images per setting (class i %% 4 from seed i)")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--scheduler", default="dpm++2m")
    parser.add_argument("--scales", default="0,1,3,10", help="classifier guidance scales on the unconditional model")
    parser.add_argument("--cfg", default="1,3,7", help="classifier-free guidance scales on the class-conditional model")
    parser.add_argument("--text-model", default="", help="a text-conditioned pipeline to guide too (e.g. the demo's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = train_unets(args)
    wanted = [CLASSES[i % len(CLASSES)] for i in range(args.n)]
    seeds = list(range(args.n))
    sampling = dict(seeds=seeds, steps=args.sampling_steps, scheduler=args.scheduler, batch_size=64, progress=False)
    rows = []

    def measure(label: str, pipe, prompts, classes=wanted, **kw) -> None:
        t0 = time.time()
        images = [r["image"] for r in generate(pipe, prompts, class_labels=classes, **sampling, **kw)]
        row = {"setting": label, **shape_accuracy(images, classes), "seconds": round(time.time() - t0, 1),
               **{k: v for k, v in kw.items() if k != "classifier"}}
        print(json.dumps(row))
        rows.append(row)

    uncond = load_pipeline(paths["unconditional"], device="cpu", dtype="float32")
    classifier = load_classifier(paths["classifier"], expect_vae=vae_identity(uncond.vae))
    for s in [float(x) for x in args.scales.split(",")]:
        measure(f"unconditional + classifier guidance s={s:g}", uncond, [""] * args.n, guidance_scale=1.0,
                classifier=classifier, classifier_scale=s)
    cond = load_pipeline(paths["class-conditional"], device="cpu", dtype="float32")
    for w in [float(x) for x in args.cfg.split(",")]:
        measure(f"class-conditional, CFG w={w:g}", cond, [""] * args.n, guidance_scale=w)
    if args.text_model:
        text = load_pipeline(args.text_model, device="cpu", dtype="float32")
        scenes = shapes.eval_prompts(args.n)  # the demo's adherence prompts: every attribute named
        for s in (0.0, 3.0):
            measure(f"demo text model, CFG 4 + classifier guidance s={s:g}", text, [p for p, _ in scenes],
                    [scene.objects[0].shape for _, scene in scenes], guidance_scale=4.0,
                    classifier=classifier, classifier_scale=s)
    accuracy = classifier[1]["eval"]
    out = Path(args.out)
    (out / "guidance.json").write_text(json.dumps({
        "budget": {"unet_steps": args.steps, "batch_size": args.batch, "classifier_steps": args.classifier_steps},
        "sampling": {k: v for k, v in sampling.items() if k != "seeds"} | {"n": args.n}, "rows": rows,
        "classifier_accuracy": accuracy}, indent=2))
    plot(rows, out / "adherence.png", args)
    shutil.copy(out / "classifier" / "accuracy.png", out / "classifier-accuracy.png")
    print(f"wrote {out / 'guidance.json'}, {out / 'adherence.png'}")


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    colors = ["tab:blue" if "unconditional" in r["setting"] else "tab:orange" if "class-cond" in r["setting"]
              else "tab:green" for r in rows]
    err = [[r["shape_accuracy"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["shape_accuracy"] for r in rows]]
    ax.barh(range(len(rows)), [r["shape_accuracy"] for r in rows], xerr=err, color=colors, capsize=2)
    ax.set_yticks(range(len(rows)), [r["setting"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1 / len(CLASSES), color="gray", ls="--", lw=1)
    ax.set(xlim=(0, 1), xlabel="shape accuracy (analyzer)",
           title=f"shapes, U-Nets (a), (b): {args.steps} steps x {args.batch}, n={args.n}, {args.scheduler} {args.sampling_steps} steps")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
