#!/usr/bin/env python
"""Stage-2 encode throughput (images/s): ldm's latent cache vs a plain diffusers loop, one process.

    python bench/bench_encode.py --tiny    # CPU-sized: tiny-f4 VAE, 32 px shapes, 512 images
    python bench/bench_encode.py           # GPU-sized: kl-f8 (SD's VAE layout, random weights), 512 px

Both start from the same AutoencoderKL directory and the same shapes images, prepared by the
same transform, and end with the posterior mean and std on disk; both are timed end to end
(load the VAE, make and prepare the images, encode, write). The baseline is what diffusers'
example scripts do: a DataLoader (num_workers 0, their --dataloader_num_workers default), fp32,
`vae.encode` per batch under no_grad. Ours is `encode_dataset`: bf16 and channels_last on a GPU,
a reading thread ahead of the VAE, plus what the baseline skips (weights hash, shards written
atomically, manifest). Each side runs --repeats times after a warm-up; the best time counts.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from bench.common import report  # noqa: E402

from ldm.config import load_config  # noqa: E402
from ldm.train.encode import EncodeConfig, encode_dataset  # noqa: E402
from ldm.data.shapes import ShapesDataset  # noqa: E402
from ldm.data.transforms import TransformConfig, prepare_image  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny-f4 VAE at 32 px, 512 images (a CPU run)")
    p.add_argument("--images", type=int, help="images per run (default 512 tiny, 1024 full)")
    p.add_argument("--resolution", type=int, help="px (default 32 tiny, 512 full)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward, both sides")
    p.add_argument("--workers", type=int, default=0, help="baseline DataLoader workers")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best counts")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    args.preset = "tiny-f4" if args.tiny else "kl-f8"
    args.images = args.images or (512 if args.tiny else 1024)
    args.resolution = args.resolution or (32 if args.tiny else 512)
    return args


def save_vae(path: Path, preset: str) -> Path:
    from diffusers import AutoencoderKL

    from ldm.models.presets import vae_config

    torch.manual_seed(0)
    AutoencoderKL(**vae_config(preset)).save_pretrained(path)
    return path


class PreparedShapes(torch.utils.data.Dataset):
    """The baseline's dataset: shapes image i through the same transform as the cache's."""

    def __init__(self, n: int, resolution: int):
        self.shapes = ShapesDataset(size=n, resolution=resolution, seed=0)
        self.transform = TransformConfig(resolution=resolution)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return prepare_image(self.shapes[i]["image"], self.transform, random.Random(i))[0]


def run_baseline(vae_dir: Path, out: Path, args, device: torch.device) -> None:
    """A plain diffusers encode loop: fp32, batches from a DataLoader, one file at the end."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
    loader = torch.utils.data.DataLoader(PreparedShapes(args.images, args.resolution), batch_size=args.batch_size,
                                         num_workers=args.workers)
    means, stds = [], []
    with torch.no_grad():
        for x in loader:
            dist = vae.encode(x.to(device)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
    out.mkdir(parents=True)
    save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}, str(out / "latents.safetensors"))


def run_ours(vae_dir: Path, out: Path, args, accelerator) -> None:
    cfg = load_config(EncodeConfig, None, [
        f"vae={vae_dir}", f"out_dir={out}", f"batch_size={args.batch_size}", "shard_size=1024",
        "data.source.kind=shapes", f"data.source.size={args.images}", f"data.source.resolution={args.resolution}",
        "data.source.seed=0", f"data.transform.resolution={args.resolution}", "data.eval_size=0"])
    encode_dataset(cfg, accelerator)


def max_difference(ours_dir: Path, base_dir: Path) -> float:
    """Largest |mean difference| between the two sides' latents: both did the same work (bf16 shows here)."""
    from safetensors.torch import load_file

    from ldm.data.cache import open_cache

    cache = open_cache(ours_dir)
    mean, _ = cache.posterior(list(range(len(cache))))
    return float((mean - load_file(base_dir / "latents.safetensors")["mean"]).abs().max())


def best_times(runs: dict, repeats: int) -> dict[str, float]:
    """Each run's best wall time; the runs take turns, so a drift in machine load hits both."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
            print(f"{name}: {times[name][-1]:.2f} s", flush=True)  # as it goes: a later overrun keeps these
    return {name: min(t) for name, t in times.items()}


def main(argv=None) -> dict:
    from accelerate import Accelerator

    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    device = accelerator.device
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_dir = save_vae(tmp / "vae", args.preset)
        runs = itertools.count()  # a fresh output directory for every run

        def baseline() -> None:
            run_baseline(vae_dir, tmp / f"base-{next(runs)}", args, device)

        def ours() -> None:
            run_ours(vae_dir, tmp / f"ours-{next(runs)}", args, accelerator)

        warm = argparse.Namespace(**{**vars(args), "images": 2 * args.batch_size})
        run_baseline(vae_dir, tmp / "warm-base", warm, device)  # CUDA context, kernels, file cache
        run_ours(vae_dir, tmp / "warm-ours", warm, accelerator)
        difference = max_difference(tmp / "warm-ours", tmp / "warm-base")
        best = best_times({"baseline": baseline, "ours": ours}, args.repeats)
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "vae": args.preset, "resolution": args.resolution, "images": args.images, "batch_size": args.batch_size,
        "baseline_workers": args.workers, "torch_threads": torch.get_num_threads(),
        "baseline_images_per_s": round(args.images / best["baseline"], 2),
        "ours_images_per_s": round(args.images / best["ours"], 2), "max_latent_mean_difference": difference,
    }
    figures["ratio"] = round(figures["ours_images_per_s"] / figures["baseline_images_per_s"], 3)
    return report(figures, f"plain diffusers loop: {figures['baseline_images_per_s']:.1f} images/s | ldm encode: "
                           f"{figures['ours_images_per_s']:.1f} images/s | ratio {figures['ratio']:.2f}x", args.json)


if __name__ == "__main__":
    main()
