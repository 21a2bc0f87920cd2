#!/usr/bin/env python
"""Sampling latency (s per image): ldm.infer.generate with the fast paths vs StableDiffusionPipeline, one process.

    python bench/bench_sample.py --tiny        # CPU-sized: tiny pipeline at 32 px, 10 steps
    python bench/bench_sample.py               # GPU: SD-1.5-size pipeline (random weights), 512 px, 50 steps, bf16
    python bench/bench_sample.py --ablation    # the U-Net step alone (CFG batch 2) as each fast path is added
    python bench/bench_sample.py --compile-baseline   # the baseline's U-Net compiled too (diffusers' docs' recipe)

Both sides load the same saved pipeline directory (SD-1.5's U-Net, VAE and CLIP ViT-L text
encoder layouts with random weights, SD-1.5's default PNDM scheduler), in the same dtype (bf16 on
a GPU, fp32 on a CPU), and make the same images: same prompts, one CPU generator per image
seeded alike, classifier-free guidance 7.5, `--steps` steps, PIL images out; timed end to end
(text encoding, denoising, VAE decode, conversion). Baseline: `StableDiffusionPipeline.__call__`,
eager, SDPA attention (diffusers' defaults). Ours: `ldm.infer.generate` on a pipeline from
`load_pipeline`, made fast by `ldm.fast.apply_to_pipeline(pipe, FastConfig.sampling())`: fused
QKV, channels_last, torch.compile with CUDA graphs (mode reduce-overhead), the VAE decoder
compiled. For each batch size, each side runs once to warm up (ours compiles and records its
graphs there), then --repeats times taking turns; the best time counts. The images' largest
difference between the sides is printed as a check that both did the same work (0 on a CPU up to
float rounding; bf16 and compiled kernels round differently on a GPU).

Peak memory per side on a GPU: torch.cuda.max_memory_allocated during its runs, less the other
side's weights (both pipelines stay loaded so that the runs can take turns).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from bench.common import report, synchronize  # noqa: E402

from ldm.fast import FastConfig, apply_fast_paths, apply_to_pipeline, effective  # noqa: E402
from ldm.infer import generate, load_pipeline  # noqa: E402

PROMPTS = ["a large red circle in the center, on a white background", "a small blue square on the left",
           "a green triangle at the top, on a black background", "two yellow circles, on a gray background"]
GUIDANCE = 7.5
# U-Net step rows, cumulative: each adds one fast path to the row above (FastConfig fields).
UNET_ROWS: dict[str, dict] = {
    "classic attention": dict(sdpa=False, channels_last=False, compile=False),
    "+SDPA (diffusers' default)": dict(channels_last=False, compile=False),
    "+channels_last": dict(compile=False),
    "+fused QKV": dict(fuse_qkv=True, compile=False),
    "+torch.compile": dict(fuse_qkv=True, fullgraph=True, dynamic=False),
    "+CUDA graphs (reduce-overhead)": dict(fuse_qkv=True, fullgraph=True, dynamic=False, compile_mode="reduce-overhead"),
}
AUTOTUNE_ROW = {"max-autotune (+CUDA graphs)": dict(fuse_qkv=True, fullgraph=True, dynamic=False, compile_mode="max-autotune")}
GB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny pipeline at 32 px, 10 steps (a CPU run)")
    p.add_argument("--steps", type=int, help="denoising steps (default 10 tiny, 50 full)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="images per call")
    p.add_argument("--scheduler", default="pndm", help="sampler short name, both sides (SD-1.5 ships PNDM)")
    p.add_argument("--repeats", type=int, help="timed runs per side and batch size; the best counts (default 2 tiny, 3 full)")
    p.add_argument("--compile-baseline", action="store_true", help="baseline U-Net: channels_last + torch.compile(fullgraph)")
    p.add_argument("--ablation", action="store_true", help="time the U-Net step alone as each fast path is added")
    p.add_argument("--autotune", action="store_true", help="with --ablation: also mode max-autotune (minutes to compile)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    args.unet, args.vae, args.text = ("tiny", "tiny-f4", "tiny") if args.tiny else ("sd15", "kl-f8", "sd15")
    args.steps = args.steps or (10 if args.tiny else 50)
    args.repeats = args.repeats or (2 if args.tiny else 3)
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    return args


def module_bytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def save_pipeline(path: Path, args) -> Path:
    """A StableDiffusionPipeline directory with random weights of the chosen sizes."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.presets import SD_SCHEDULER_CONFIG, unet_config, vae_config
    from ldm.models.text import TEXT_PRESETS, build_tokenizer
    from ldm.sampling import make_scheduler

    torch.manual_seed(0)
    with torch.device(args.device):  # initialising SD-size weights is minutes on a CPU, seconds on a GPU
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS[args.text]))
        unet = UNet2DConditionModel(**unet_config(args.unet, cross_attention_dim=text_encoder.config.hidden_size))
        vae = AutoencoderKL(**vae_config(args.vae))
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
        scheduler=make_scheduler(args.scheduler, SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=args.dtype).save_pretrained(path)
    return path


def load_baseline(path: Path, args):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(path, torch_dtype=args.dtype, safety_checker=None,
                                                 requires_safety_checker=False).to(args.device)
    sd.set_progress_bar_config(disable=True)
    if args.compile_baseline:
        sd.unet.to(memory_format=torch.channels_last)
        sd.unet = torch.compile(sd.unet, fullgraph=True)
    return sd


def load_ours(path: Path, args):
    return apply_to_pipeline(load_pipeline(path, device=str(args.device), dtype=args.dtype), FastConfig.sampling())


def run_baseline(sd, batch: int, args, output_type: str = "pil"):
    generators = [torch.Generator().manual_seed(s) for s in range(batch)]
    out = sd(PROMPTS[:batch], num_inference_steps=args.steps, guidance_scale=GUIDANCE, generator=generators,
             output_type=output_type).images
    synchronize(args.device)
    return out


def run_ours(pipe, batch: int, args):
    out = generate(pipe, PROMPTS[:batch], seeds=list(range(batch)), steps=args.steps, guidance_scale=GUIDANCE,
                   batch_size=batch, progress=False)
    synchronize(args.device)
    return out


def time_side(run, device: torch.device, other_bytes: int) -> tuple[float, float | None]:
    """(seconds, peak GB of this run less the other side's resident weights)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - other_bytes) / GB if device.type == "cuda" else None
    return seconds, peak


def compare(args, path: Path) -> dict:
    sd, pipe = load_baseline(path, args), load_ours(path, args)
    sizes = {"baseline": module_bytes(sd.unet, sd.vae, sd.text_encoder),
             "ours": module_bytes(pipe.unet, pipe.vae, pipe.text_encoder)}
    figures = {}
    for batch in args.batch_sizes:
        # warm-up: CUDA context, cuDNN's algorithm search, ours compiles and records its CUDA graphs
        base_images = np.asarray(run_baseline(sd, batch, args, output_type="np"))
        ours_images = np.stack([r["array"] for r in run_ours(pipe, batch, args)])
        runs = {"baseline": lambda: run_baseline(sd, batch, args), "ours": lambda: run_ours(pipe, batch, args)}
        times, peaks = {name: [] for name in runs}, {name: 0.0 for name in runs}
        for _ in range(args.repeats):  # the sides take turns, so a drift in machine load hits both
            for name, run in runs.items():
                seconds, peak = time_side(run, args.device, sizes["ours" if name == "baseline" else "baseline"])
                times[name].append(seconds)
                peaks[name] = None if peak is None else max(peaks[name], round(peak, 2))
        row = {f"{name}_s_per_image": round(min(t) / batch, 4) for name, t in times.items()}
        row.update({f"{name}_peak_gb": peaks[name] for name in runs})
        row["ratio"] = round(row["baseline_s_per_image"] / row["ours_s_per_image"], 3)
        row["max_image_difference"] = float(np.abs(ours_images - base_images).max())
        figures[f"batch_{batch}"] = row
        print(f"batch {batch}: StableDiffusionPipeline {row['baseline_s_per_image']:.3f} s/image | ldm generate "
              f"{row['ours_s_per_image']:.3f} s/image | ratio {row['ratio']:.2f}x", flush=True)
    return figures


def unet_step_ms(unet, args, calls: int = 20) -> float:
    """Median ms of one CFG U-Net forward (batch 2) at the pipeline's latent size."""
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, device=args.device, dtype=args.dtype)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device=args.device, dtype=args.dtype)
    t = torch.tensor(981, device=args.device)
    times = []
    with torch.no_grad():
        for i in range(3 + calls):  # three warm-up calls: compile, then CUDA graph warm-up and recording
            synchronize(args.device)
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=emb, return_dict=False)
            synchronize(args.device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ablation(args, path: Path) -> dict:
    from diffusers import UNet2DConditionModel

    rows = {}
    for name, fields in {**UNET_ROWS, **(AUTOTUNE_ROW if args.autotune else {})}.items():
        torch._dynamo.reset()  # a fresh module per row; earlier rows' compiled code would only count towards recompile limits
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=args.dtype).to(args.device).eval()
        cfg = FastConfig(**fields)
        apply_fast_paths(unet, cfg, args.device)
        rows[name] = round(unet_step_ms(unet, args), 3)
        skipped = cfg.compile and not effective(cfg, args.device).compile
        note = f"  (compile is off on {args.device.type}: the row above again)" if skipped else ""
        print(f"{name:32s} {rows[name]:8.2f} ms per U-Net step (CFG batch 2){note}", flush=True)
        del unet
    return {"unet_step_ms": rows}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_pipeline(Path(tmp) / "pipeline", args)
        figures = ablation(args, path) if args.ablation else compare(args, path)
    figures = {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
               "unet": args.unet, "dtype": str(args.dtype).removeprefix("torch."), "steps": args.steps,
               "scheduler": args.scheduler, "guidance_scale": GUIDANCE, "baseline_compiled": args.compile_baseline,
               **figures}
    return report(figures, None, args.json)


if __name__ == "__main__":
    main()
