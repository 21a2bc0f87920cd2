"""How good a text-to-image pipeline is: prompt adherence on `shapes`, and FID/KID/retrieval on any data.

The analyzer (`ldm.data.shapes.analyze`) recovers colour, shape, size, position and background
from a picture; comparing them with the attributes the prompt asked for gives per-attribute
accuracy, a direct measure of whether a text-to-image model follows its prompts.

On any image folder (captions in metadata.jsonl/csv or sidecar .txt), the measures of
`ldm.quality` (FID and KID with the real-vs-real floor, caption retrieval with its ceiling,
bootstrap intervals), for our pipelines, diffusers SD directories and single files alike:

    python -m ldm.evaluate PIPELINE --data FOLDER [--features clip:DIR|inception:FILE] [--n 200]
        [--steps 25 --guidance-scale 7.5 --guidance-interval LO HI --scheduler NAME --seed 0] [--out DIR]
        [--compare OTHER/eval.json]
    (sampling settings default to the pipeline's recommended ones, ldm.json's "sampling")

writes DIR/eval.json and DIR/heldout-vs-generated.png (32 held-out images, each above the image
generated from its caption). The held-out images are the
data's held-out split (`data.eval_size` = N), the floor's reference the first N training images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ldm.data import shapes
from ldm.data.images import DataConfig, image_grid, plan_split
from ldm.data.sources import SourceConfig
from ldm.data.transforms import TransformConfig
from ldm.infer import Pipeline, generate


def prompt_adherence(pipe: Pipeline, n: int = 64, seed: int = 0, exclude=(), out_dir: str | Path | None = None,
                     only=(), name: str = "adherence", **sampling) -> dict:
    """Accuracy per attribute over `n` balanced single-object prompts (one image each), drawn
    from the combinations that match none of `exclude` and, if given, one of `only`.

    `sampling` goes to `ldm.infer.generate` (scheduler, steps, guidance_scale, batch_size...).
    With `out_dir`, writes `<name>.json` (with the scores of small and large objects apart, and of
    each background apart: colours on black are what the demo's U-Net gets wrong first) and
    `<name>-grid.png` (prompt order).
    """
    prompts = shapes.eval_prompts(n, seed=seed, exclude=exclude, only=only)
    texts = [text for text, _ in prompts]
    results = generate(pipe, texts, seeds=[seed * 100_000 + i for i in range(n)], **sampling)
    images = [r["image"] for r in results]
    scenes = [scene for _, scene in prompts]
    by_size = scores_by_size(images, scenes)
    scores = by_size["all"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        image_grid(images, nrow=8).save(out_dir / f"{name}-grid.png")
        record = {"n": n, "scores": scores, "by_size": {k: v for k, v in by_size.items() if k != "all"},
                  "by_background": scores_by_background(images, scenes), "prompts": texts,
                  "sampling": {k: v for k, v in sampling.items() if isinstance(v, (int, float, str, tuple, list))}}
        (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    return scores


def scores_by_size(images, scenes) -> dict[str, dict[str, float]]:
    """`shapes.score` over all single-object images, and over the small and the large ones apart:
    a small shape is a few pixels across, so its shape is what a model gets wrong first."""
    images, scenes = list(images), list(scenes)
    return {"all": shapes.score(images, scenes), **scores_by(images, scenes, lambda s: s.objects[0].size, shapes.SIZES)}


def scores_by_background(images, scenes) -> dict[str, dict[str, float]]:
    """`shapes.score` over the images of each background apart."""
    return scores_by(list(images), list(scenes), lambda s: s.background, shapes.BACKGROUNDS)


def scores_by(images: list, scenes: list, key, values) -> dict[str, dict[str, float]]:
    """`shapes.score` of the images whose scene has each of `values` under `key` (absent values left out)."""
    result = {}
    for value in values:
        chosen = [i for i, scene in enumerate(scenes) if key(scene) == value]
        if chosen:
            result[value] = shapes.score([images[i] for i in chosen], [scenes[i] for i in chosen])
    return result


@torch.no_grad()
def reconstruction_adherence(vae, resolution: int, batch_size: int = 64, only=()) -> dict[str, dict[str, float]]:
    """What the analyzer reads back from a VAE's reconstructions of every single-object scene
    (with `only`, of those that match one of its entries).

    This is the ceiling of prompt adherence for any U-Net trained on that VAE's latents: a shape
    the decoder cannot draw from a clean latent (the posterior mode), it cannot draw from a
    generated one. Returns `scores_by_size` of the (720) reconstructions.
    """
    scenes = shapes.all_single_object_scenes(only=only)
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


def combination_kind(entry: dict) -> str:
    """What a held-out combination binds, e.g. "color + shape" for {"shape": "star", "color": "red"}."""
    return " + ".join(sorted(entry))


def composition_adherence(pipe: Pipeline, heldout: list[dict], n_heldout: int = 32, n_seen: int = 128, seed: int = 0,
                          out_dir: str | Path | None = None, **sampling) -> dict:
    """Prompt adherence on the attribute combinations a model was trained without, each apart,
    beside the combinations it saw (every single-object scene that matches no held-out entry).

    With `out_dir`, writes `adherence.json` with both, and a grid of each (`heldout-<i>-grid.png`,
    `seen-grid.png`). `heldout` is the `data.source.exclude` of the model's training data. Each
    held-out row carries its ceiling, `vae_ceiling`: the scores of the pipeline's VAE reconstructing
    every scene of that combination (a VAE that never saw green on black may not draw it back).
    """
    rows = []
    resolution = pipe.native_height_width[0]
    for i, entry in enumerate(heldout):
        scores = prompt_adherence(pipe, n=n_heldout, seed=seed, only=[entry], out_dir=out_dir, name=f"heldout-{i}", **sampling)
        ceiling = reconstruction_adherence(pipe.vae, resolution, only=[entry])["all"]
        rows.append({"combination": dict(entry), "kind": combination_kind(entry), "n": n_heldout, "scores": scores,
                     "vae_ceiling": ceiling})
    seen = prompt_adherence(pipe, n=n_seen, seed=seed, exclude=heldout, out_dir=out_dir, name="seen", **sampling)
    record = {"heldout": rows, "seen": {"n": n_seen, "scores": seen},
              "sampling": {k: v for k, v in sampling.items() if isinstance(v, (int, float, str, tuple, list))}}
    if out_dir is not None:
        (Path(out_dir) / "adherence.json").write_text(json.dumps(record, indent=2))
    return record


def format_composition(record: dict) -> str:
    """The held-out and seen rows of `composition_adherence` as a Markdown table."""
    order = ["color", "shape", "size", "position", "background", "all"]
    lines = ["| held out of training | n | " + " | ".join(order) + " | VAE ceiling (all) |",
             "|---|---|" + "---|" * (len(order) + 1)]
    for row in record["heldout"]:
        what = ", ".join(f"{k} {v}" for k, v in row["combination"].items())
        ceiling = f"{row['vae_ceiling']['all']:.0%}" if "vae_ceiling" in row else ""
        lines.append(f"| {row['kind']}: {what} | {row['n']} | " + " | ".join(f"{row['scores'][k]:.0%}" for k in order)
                     + f" | {ceiling} |")
    seen = record["seen"]
    lines.append(f"| seen combinations | {seen['n']} | " + " | ".join(f"{seen['scores'][k]:.0%}" for k in order) + " | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- FID/KID/retrieval on any data


def folder_data(path: str | Path, resolution: int, n: int) -> DataConfig:
    """An imagefolder's data config with N held out, or half of the folder when it holds fewer than 2N
    images (the other half is the floor's reference). A prepared folder's own split (`heldout.txt`,
    `python -m ldm.data.prepare`) is used as it is, so the floor's training images are the ones a run
    on that folder trained on, as in the run's own figures."""
    from ldm.data.sources import open_source

    source = SourceConfig(kind="imagefolder", path=str(path))
    if (Path(path) / "heldout.txt").is_file():
        return DataConfig(source=source, transform=TransformConfig(resolution=resolution),
                          heldout=str(Path(path) / "heldout.txt"))
    total = len(open_source(source))
    held_out = min(n, total // 2)
    if held_out < n:
        print(f"{path} holds {total} files: n={held_out} held-out images (and as many training ones for the floor) "
              f"instead of {n}")
    return DataConfig(source=source, transform=TransformConfig(resolution=resolution), eval_size=held_out)


def pipeline_features(pipe: Pipeline) -> str:
    """The default feature network of a pipeline: the CLIP whose text tower it was trained with, when
    train_clip.py made it (ldm.json records it); else an error saying what to pass."""
    from ldm.infer import _ldm_record
    from ldm.quality import default_features

    encoder = (_ldm_record(Path(pipe.path)).get("train_config") or {}).get("text", {}).get("encoder", "")
    spec, why = default_features(encoder)
    if not spec:
        raise ValueError(f"--features: no default for {pipe.path}: {why.replace('validation.features', '--features')}")
    return spec


def evaluate_pipeline(pipe: Pipeline, data: DataConfig, features: str, n: int = 200, seed: int = 0, resamples: int = 200,
                      out_dir: str | Path | None = None, compare: str | Path | None = None, batch_size: int = 16,
                      offset: int = 0, **sampling) -> dict:
    """FID, KID and caption retrieval of `pipe`'s images for the held-out captions of `data` (image i
    from seed 100,000 x seed + i), with floor, ceiling and intervals (see ldm.quality). `offset`: the
    held-out images from that one on (ldm.quality.real_images). `compare`: another eval.json,
    refused when made with another network, N or offset. Writes out_dir/eval.json."""
    from ldm.metrics import check_comparable
    from ldm.quality import QualityEval, load_feature_network, real_images, summary_line

    network = load_feature_network(features, pipe.device)
    held_out, captions, reference = real_images(data, n, offset)
    quality = QualityEval(network, held_out, captions, reference, resamples=resamples, seed=seed)
    other = None
    if compare is not None:  # before the generation, the costly part
        other = json.loads(Path(compare).read_text())
        check_comparable({"features": network.identity, "n": quality.n, "offset": offset}, other, "this evaluation",
                         str(compare))
    results = generate(pipe, quality.prompts, seeds=quality.seeds, batch_size=batch_size, **sampling)
    images = torch.stack([torch.from_numpy(r["array"]).permute(2, 0, 1) for r in results]) * 2 - 1
    figures = quality(images)
    record = {"pipeline": pipe.path, "data": data.source.path, "features": figures["features"], "n": figures["n"],
              "offset": offset,
              "sampling": {k: v for k, v in results[0].items()
                           if k in ("scheduler", "steps", "guidance_scale", "guidance_interval", "width", "height")},
              "seed": seed, "split": plan_split(data).record(), "quality": figures,
              "items": quality.item_ranks(images)}
    print(f"quality: {summary_line(figures)}")
    if record["items"]:
        print(f"quality: {misses_line(record['items'])} (per caption: \"items\" in eval.json)")
    if other is not None:
        record["compared_with"] = {"path": str(compare), "quality": other.get("quality", {})}
        print(format_comparison(figures, other.get("quality", {}), str(compare)))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(record, indent=2))
        pairs_grid(held_out, images).save(out_dir / "heldout-vs-generated.png")
    return record


def misses_line(items: list[dict]) -> str:
    """How the top-1 misses split: captions found for the real image but not the generated one, and back."""
    lost = sum(1 for i in items if i["real_rank"] == 1 < i["rank"])
    gained = sum(1 for i in items if i["rank"] == 1 < i["real_rank"])
    return (f"top-1 misses: {lost} of the {len(items)} captions found for the real image are not for the generated "
            f"one; {gained} found for the generated image are not for the real one")


def pairs_grid(real: torch.Tensor, generated: torch.Tensor, count: int = 32, nrow: int = 8):
    """Rows of `nrow` held-out images, each above the images generated from their captions."""
    count = min(count, len(real), len(generated))
    rows = [t[s : min(s + nrow, count)] for s in range(0, count, nrow) for t in (real, generated)]
    if count % nrow:  # pad the last pair of rows so each generated image stays below its real one
        pad = torch.ones(nrow - count % nrow, *real.shape[1:])
        rows[-2], rows[-1] = torch.cat([rows[-2], pad]), torch.cat([rows[-1], pad])
    return image_grid(torch.cat(rows), nrow=nrow)


def format_comparison(ours: dict, theirs: dict, label: str) -> str:
    rows = [f"{'figure':<12}{'this':>12}{label[-28:]:>30}"]
    for key in ("fid", "kid", "top1", "top5", "mean_rank", "fid_floor", "top1_ceiling"):
        if key in ours and key in theirs:
            rows.append(f"{key:<12}{ours[key]:>12.4g}{theirs[key]:>30.4g}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.evaluate", description=(
        "FID, KID (with the real-vs-real floor) and caption retrieval (with the real images' ceiling) of a "
        "pipeline's images for an image folder's held-out captions, with bootstrap 95%% intervals."))
    p.add_argument("model", help="run dir, pipeline dir, SD diffusers dir, or single-file .safetensors")
    p.add_argument("--data", required=True, help="image folder (captions: metadata.jsonl/csv or sidecar .txt)")
    p.add_argument("--features", default="", help="clip:DIR (a CLIP from train_clip.py) or inception:FILE; default: "
                   "the CLIP whose text tower the pipeline was trained with")
    p.add_argument("--n", type=int, default=200, help="held-out images and prompts (one image each)")
    p.add_argument("--resolution", type=int, help="px the real images are resized to; default: the model's native size")
    p.add_argument("--steps", type=int, help="default: the pipeline's (ldm.json's recommended, else 25)")
    p.add_argument("--guidance-scale", type=float, help="default: the pipeline's (ldm.json's recommended, else 7.5)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only the steps whose noise level (EDM sigma) is in (LO, HI]; default: the pipeline's "
                   "(ldm.json), else every step; 0 inf: every step")
    p.add_argument("--scheduler", help="sampler short name; default: the pipeline's")
    p.add_argument("--offset", type=int, default=0,
                   help="skip the first OFFSET held-out images (in the key-hash order the run's own figures take "
                        "them): with --offset N, a second set of N to choose settings on, the first N kept for the report")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed 100000 x SEED + i")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the 95%% intervals")
    p.add_argument("--device", help="cuda | mps | cpu (default: the best available)")
    p.add_argument("--compare", help="another eval.json: print side by side; refused if its network or n differ")
    p.add_argument("--out", default="outputs/eval", help="output directory (eval.json, heldout-vs-generated.png)")
    return p


def main(argv=None) -> None:
    from ldm.infer import load_pipeline
    from ldm.metrics import IncomparableMetricsError

    args = build_parser().parse_args(argv)
    if args.n < 2:
        sys.exit("--n must be >= 2: FID and KID need two images per set")
    pipe = load_pipeline(args.model, device=args.device)
    try:
        features = args.features or pipeline_features(pipe)
        data = folder_data(args.data, args.resolution or pipe.native_size, args.n + args.offset)
        evaluate_pipeline(pipe, data, features, n=args.n, seed=args.seed, resamples=args.bootstrap, out_dir=args.out,
                          compare=args.compare, batch_size=args.batch_size, offset=args.offset, steps=args.steps,
                          guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval,
                          scheduler=args.scheduler)
    except (ValueError, FileNotFoundError, IncomparableMetricsError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
