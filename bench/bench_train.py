#!/usr/bin/env python
"""Stage-3 training throughput (images/s): ldm's trainer step vs diffusers' example loop, one process.

    python bench/bench_train.py --tiny        # CPU-sized: tiny U-Net, VAE and text encoder, 32 px, batch 8
    python bench/bench_train.py               # GPU: SD-1.5 U-Net, kl-f8 VAE, CLIP ViT-L text (random weights), 512 px, batch 32
    python bench/bench_train.py --ablation    # ours with the fast paths added one at a time (a process per row)
    python bench/bench_train.py --memory      # peak GPU memory of SD-1.5 fine-tunes at 512 px (checkpointing, EMA), batch 1-4

Both sides train a freshly initialised U-Net of the same preset on the same shapes images and
captions, on one device, with the same precision (bf16 autocast on a GPU, fp32 on a CPU).

Baseline, the way diffusers' examples/text_to_image/train_text_to_image.py trains with
--mixed_precision bf16: fp32 master weights under accelerate's autocast, the VAE and text encoder
cast to bf16, and at every step: VAE-encode the images and sample, encode the captions, noise
and timesteps, the U-Net, MSE, backward, clip at 1.0, AdamW (torch's default: foreach), and
loss.item() for the log. The images are prepared once in memory (tensors, as its dataset map
makes them) so that image decoding does not decide the figure. A second baseline row takes the
latents and text embeddings precomputed, with the rest unchanged.

Ours: the optimiser step of ldm.train.ldm.train_ldm, called as the trainer calls it
(ldm.train.ldm.UNetStep: sample_generators, LatentCache.latents with a fresh posterior sample,
conditioning with the cached text embeddings and caption dropout, noised_inputs, the U-Net,
diffusion_loss, the non-finite guard, backward, clip, the optimizer, the EMA) on size_batches,
with make_optimizer's fused AdamW and ldm.fast.FastConfig applied (channels_last, torch.compile). The cache is made by encode_dataset first, untimed.

Each side: --warmup steps (ours compiles here), then --steps timed steps ending in a device
synchronise; peak memory (torch.cuda.max_memory_allocated) per side on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from bench.common import report, synchronize  # noqa: E402

from ldm.config import load_config  # noqa: E402
from ldm.data.cache import open_cache, text_identity  # noqa: E402
from ldm.data.shapes import ShapesDataset  # noqa: E402
from ldm.data.transforms import TransformConfig, prepare_image  # noqa: E402
from ldm.diffusion import make_train_scheduler  # noqa: E402
from ldm.fast import FastConfig, apply_fast_paths, effective  # noqa: E402
from ldm.models.conditioning import TextEncoderConfig, load_text  # noqa: E402
from ldm.models.lora import LoRAConfig, add_lora  # noqa: E402
from ldm.models.text import encode_prompts  # noqa: E402
from ldm.models.unet import UNetModelConfig, build_unet  # noqa: E402
from ldm.train.common import LoopConfig, NonFiniteGuard, make_optimizer  # noqa: E402
from ldm.train.ema import make_ema  # noqa: E402
from ldm.train.encode import EncodeConfig, encode_dataset  # noqa: E402
from ldm.train.ldm import LDMTrainConfig, UNetStep, size_batches  # noqa: E402

# Ablation rows, cumulative: each adds one fast path to the row above. The last is "ours" of the
# main comparison. precision: accelerate's mixed_precision; fused: make_optimizer's fused AdamW
# (else torch's default foreach AdamW, the baseline's); fast: FastConfig fields.
VARIANTS: dict[str, dict] = {
    "fp32": dict(precision="no", fused=False, fast=dict(tf32=False, channels_last=False, compile=False)),
    "+tf32": dict(precision="no", fused=False, fast=dict(channels_last=False, compile=False)),
    "+bf16": dict(precision="bf16", fused=False, fast=dict(channels_last=False, compile=False)),
    "+channels_last": dict(precision="bf16", fused=False, fast=dict(compile=False)),
    "+fused_adamw": dict(precision="bf16", fused=True, fast=dict(compile=False)),
    "+compile": dict(precision="bf16", fused=True, fast=dict()),
}
OURS = "+compile"
MEMORY_BATCHES = (1, 2, 4)
MEMORY_OPTIMIZERS = {  # what holds the weights and the AdamW state
    "fp32 weights + AdamW": "fp32",
    "bf16 weights + AdamW": "bf16",
    "fp32 weights + 8-bit AdamW": "8bit",
    "LoRA rank 16 on fp32 weights + AdamW": "lora",
}
GB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models at 32 px, batch 8 (a CPU run)")
    p.add_argument("--batch-size", type=int, help="images per step, both sides (default 8 tiny, 32 full)")
    p.add_argument("--steps", type=int, help="timed steps per side (default 3 tiny, 10 full)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (compilation happens here)")
    p.add_argument("--ablation", action="store_true", help="ours with the fast paths added one at a time")
    p.add_argument("--memory", action="store_true", help="peak memory of batch 1-4 fine-tune configs (checkpointing, EMA)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one ablation row (a child process)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    args.unet, args.vae, args.text = ("tiny", "tiny-f4", "tiny") if args.tiny else ("sd15", "kl-f8", "sd15")
    args.resolution = 32 if args.tiny else 512
    args.batch_size = args.batch_size or (8 if args.tiny else 32)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.images = 2 * max(args.batch_size, max(MEMORY_BATCHES))
    return args


def device_of(args) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GB, 2) if device.type == "cuda" else None


def release(device: torch.device, accelerator) -> None:
    """Forget one side's models and optimizer before the next side, and start a new memory peak.
    Only on a GPU: on a CPU no peak is measured, and a collection costs seconds with a tokenizer's
    vocabulary in memory."""
    if device.type != "cuda":
        return
    accelerator.free_memory()  # the accelerator keeps references to what it prepared
    gc.collect()  # after it: a prepared model refers to itself (its wrapped forward), so only a collection frees it
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- shared data


@dataclasses.dataclass
class Assets:
    vae_dir: Path
    cache_dir: Path
    pixels: torch.Tensor      # (N, 3, H, W) in [-1, 1], as the cache's transform prepared them
    captions: list[str]


def make_assets(tmp: Path, args, accelerator) -> Assets:
    """A VAE directory (random weights), the shapes images and captions, and their latent cache with text."""
    from diffusers import AutoencoderKL

    from ldm.models.presets import vae_config

    torch.manual_seed(0)
    vae_dir = tmp / "vae"
    AutoencoderKL(**vae_config(args.vae)).save_pretrained(vae_dir)
    cfg = load_config(EncodeConfig, None, [
        f"vae={vae_dir}", f"out_dir={tmp / 'latents'}", "data.source.kind=shapes", f"data.source.size={args.images}",
        f"data.source.resolution={args.resolution}", "data.source.seed=0", f"data.transform.resolution={args.resolution}",
        "data.eval_size=0", f"text.encoder={args.text}"])
    encode_dataset(cfg, accelerator)
    shapes = ShapesDataset(size=args.images, resolution=args.resolution, seed=0)
    transform = TransformConfig(resolution=args.resolution)
    pixels = torch.stack([prepare_image(shapes[i]["image"], transform, random.Random(i))[0] for i in range(args.images)])
    return Assets(vae_dir, Path(cfg.out_dir), pixels, [shapes[i]["caption"] for i in range(args.images)])


@functools.cache
def frozen_text(preset: str):
    """Ours' text encoder and tokenizer, built once per process: frozen, and never cast, so the
    --memory rows can share them (the tokenizer alone takes a while to build)."""
    return load_text(TextEncoderConfig(encoder=preset))


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of step(i) after `warmup` untimed ones."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize(device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- baseline


def baseline_side(assets: Assets, args, accelerator, precomputed: bool):
    """diffusers' train_text_to_image.py step; with `precomputed`, latents and text embeddings made once."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from ldm.models.presets import SD_SCHEDULER_CONFIG, unet_config

    device = accelerator.device
    weight_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    noise_scheduler = DDPMScheduler(**SD_SCHEDULER_CONFIG)
    vae = AutoencoderKL.from_pretrained(assets.vae_dir, torch_dtype=weight_dtype).requires_grad_(False).to(device)
    text_encoder, tokenizer = load_text(TextEncoderConfig(encoder=args.text))
    text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    input_ids = tokenizer(assets.captions, max_length=tokenizer.model_max_length, padding="max_length",
                          truncation=True, return_tensors="pt").input_ids
    torch.manual_seed(0)
    with torch.device(device):  # initialising 860 M parameters is minutes on a CPU, a second on a GPU
        unet = UNet2DConditionModel(**unet_config(args.unet, cross_attention_dim=text_encoder.config.hidden_size))
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    bs = args.batch_size

    def inputs(i: int):
        rows = slice((i * bs) % len(input_ids), (i * bs) % len(input_ids) + bs)
        with torch.no_grad():
            latents = vae.encode(assets.pixels[rows].to(device, dtype=weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            states = text_encoder(input_ids[rows].to(device), return_dict=False)[0]
        return latents, states

    batches = [inputs(i) for i in range(len(input_ids) // bs)] if precomputed else None

    def step(i: int) -> None:
        latents, states = batches[i % len(batches)] if precomputed else inputs(i)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, states, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
        accelerator.gather(loss.repeat(bs)).mean().item()  # the example's train_loss log, every step
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


# ----------------------------------------------------------------------------- ours


def ours_side(assets: Assets, args, accelerator, variant: str, *, fine_tune: bool = False, weights: str = "fp32"):
    """The trainer's optimiser step with the variant's fast paths. `fine_tune` adds what
    configs/ldm/sd15_finetune.yaml adds (gradient checkpointing, EMA); `weights` ("fp32", "bf16",
    "8bit", "lora": rank-16 adapters on frozen fp32 weights) picks what holds the weights and the
    optimizer state (the --memory rows)."""
    spec = VARIANTS[variant]
    device = accelerator.device
    loop = LoopConfig(batch_size=args.batch_size, lr=1e-4, mixed_precision=accelerator.mixed_precision,
                      ema_decay=0.9999 if fine_tune else 0.0)
    cfg = LDMTrainConfig(cache=str(assets.cache_dir), vae=str(assets.vae_dir), model=UNetModelConfig(preset=args.unet),
                         train=loop, gradient_checkpointing=fine_tune)
    cfg.text.encoder = args.text
    cache = open_cache(assets.cache_dir, "train")
    text_encoder, tokenizer = frozen_text(args.text)
    text_encoder.to(device)
    use_cached_text = cache.text_matches(text_identity(text_encoder, tokenizer, cfg.text.clip_skip))
    if not use_cached_text:
        raise RuntimeError("the cache's text embeddings do not match this text encoder: ours would encode text every step")
    torch.manual_seed(0)
    latent_size = int(next(iter(cache.size_groups())).split("x")[0])
    with torch.device(device):
        unet = build_unet(cfg.model, cache.manifest["latent_channels"], latent_size, text_encoder.config.hidden_size)
    unet.train()
    trainable = add_lora(unet, LoRAConfig(rank=16)) if weights == "lora" else list(unet.parameters())
    if fine_tune:
        unet.enable_gradient_checkpointing()
    if weights == "bf16":  # half the memory of weights, gradients and AdamW state; updates below bf16's resolution are lost
        unet.to(dtype=torch.bfloat16)
    apply_fast_paths(unet, FastConfig(**spec["fast"]), device)
    if spec["fused"] or weights == "8bit":
        optimizer = make_optimizer(trainable, loop, use_8bit=weights == "8bit")
    else:
        optimizer = torch.optim.AdamW(trainable, lr=loop.lr, betas=(loop.adam_beta1, loop.adam_beta2),
                                      weight_decay=loop.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = make_ema(trainable, loop, device)
    if ema is not None and weights == "bf16":
        ema.to(device=device, dtype=torch.float32)  # a bf16 average would lose every 1e-4 update
    noise_scheduler = make_train_scheduler(cfg.noise)
    empty = encode_prompts(text_encoder, tokenizer, [""], clip_skip=cfg.text.clip_skip)
    batches = size_batches(cache.size_groups(), loop.batch_size, loop.seed)
    # the trainer's own step (grad_accum = 1, one process): nothing here can drift from it
    unet_step = UNetStep(cfg=cfg, accelerator=accelerator, cache=cache, unet=unet, trainable=trainable, optimizer=optimizer,
                         noise_scheduler=noise_scheduler, text_encoder=text_encoder, tokenizer=tokenizer, empty=empty,
                         use_cached_text=use_cached_text, guard=NonFiniteGuard(loop.max_nonfinite_steps), ema=ema)
    return lambda i: unet_step(i, batches)


# ----------------------------------------------------------------------------- modes


def measure(make_step, args, accelerator) -> dict:
    """images/s and peak memory of one side, its models released afterwards."""
    device = accelerator.device
    step = make_step()
    seconds = timed_steps(step, args.warmup, args.steps, device)
    figures = {"images_per_s": round(args.batch_size * args.steps / seconds, 2), "peak_gb": peak_gb(device)}
    del step
    release(device, accelerator)
    return figures


def compare(args, accelerator, assets: Assets) -> dict:
    base = measure(lambda: baseline_side(assets, args, accelerator, precomputed=False), args, accelerator)
    print(f"baseline (VAE + text encoder every step): {base}", flush=True)  # as it goes: a later overrun keeps these
    base_pre = measure(lambda: baseline_side(assets, args, accelerator, precomputed=True), args, accelerator)
    print(f"baseline, latents precomputed: {base_pre}", flush=True)
    ours = measure(lambda: ours_side(assets, args, accelerator, OURS), args, accelerator)
    figures = {
        "baseline_images_per_s": base["images_per_s"], "baseline_peak_gb": base["peak_gb"],
        "baseline_precomputed_images_per_s": base_pre["images_per_s"], "baseline_precomputed_peak_gb": base_pre["peak_gb"],
        "ours_images_per_s": ours["images_per_s"], "ours_peak_gb": ours["peak_gb"],
    }
    figures["ratio"] = round(figures["ours_images_per_s"] / figures["baseline_images_per_s"], 3)
    figures["ratio_vs_precomputed"] = round(figures["ours_images_per_s"] / figures["baseline_precomputed_images_per_s"], 3)
    return figures


def ablation(args) -> dict:
    """Each row in its own process: accelerate fixes the precision once per process, and compile
    caches and memory peaks stay apart. A row that fails (fp32 at batch 32 may not fit) is noted."""
    rows = {}
    for name in VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--variant", name, "--json", out.name, "--warmup", str(args.warmup),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            command += ["--tiny"] * args.tiny + ["--cpu"] * args.cpu
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode == 0:
                rows[name] = json.loads(Path(out.name).read_text())["ours"]
                shown = f"{rows[name]['images_per_s']:9.2f} images/s   peak {rows[name]['peak_gb']} GB"
                if name == OURS and not rows[name]["compiled"]:
                    shown += f"  (compile is off on {device_of(args).type}: the row above again)"
            else:
                rows[name] = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
                shown = rows[name]["error"]
        print(f"{name:16s} {shown}", flush=True)
    return {"rows": rows}


def memory(args, accelerator, assets: Assets) -> dict:
    """Peak memory of SD-1.5 fine-tune configs: gradient checkpointing and an fp32 EMA on, as in
    configs/ldm/sd15_finetune.yaml (no compile: memory, not speed)."""
    rows = {}
    for label, weights in MEMORY_OPTIMIZERS.items():
        for batch in MEMORY_BATCHES:
            key = f"{label}, batch {batch}"
            run = argparse.Namespace(**{**vars(args), "batch_size": batch, "warmup": 1, "steps": 1})
            try:
                row = measure(lambda: ours_side(assets, run, accelerator, "+fused_adamw", fine_tune=True, weights=weights),
                              run, accelerator)
            except (RuntimeError, ImportError, ValueError) as err:  # out of memory, bitsandbytes or peft missing
                row = {"error": f"skipped: {str(err).splitlines()[0]}"}
            if "error" in row:  # released here, once the traceback that holds the row's models is gone
                release(accelerator.device, accelerator)
            rows[key] = row
            print(f"{key:48s} {describe_peak(row)}", flush=True)
    return {"rows": rows}


def describe_peak(row: dict) -> str:
    if "error" in row:
        return row["error"]
    if row["peak_gb"] is None:
        return "peak n/a (not a GPU)"
    return f"peak {row['peak_gb']:.2f} GB" + (" (fits 24 GB)" if row["peak_gb"] < 24 else "")


def precision_of(args, device: torch.device) -> str:
    """accelerate's mixed_precision: the ablation row's; bf16 for the fine-tune memory rows on any
    device (their bf16 weights need autocast); else bf16 on a GPU and fp32 on a CPU, both sides."""
    if args.variant:
        return VARIANTS[args.variant]["precision"]
    return "bf16" if args.memory or device.type == "cuda" else "no"


def main(argv=None) -> dict:
    from accelerate import Accelerator

    args = parse_args(argv)
    device = device_of(args)
    if args.ablation:
        figures = ablation(args)
    else:
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision_of(args, device))
        with tempfile.TemporaryDirectory() as tmp:
            assets = make_assets(Path(tmp), args, accelerator)
            release(device, accelerator)
            if args.variant:
                figures = {"ours": measure(lambda: ours_side(assets, args, accelerator, args.variant), args, accelerator)}
                figures["ours"]["compiled"] = effective(FastConfig(**VARIANTS[args.variant]["fast"]), device).compile
            elif args.memory:
                figures = memory(args, accelerator, assets)
            else:
                figures = compare(args, accelerator, assets)
        figures["precision"] = accelerator.mixed_precision
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "unet": args.unet,
               "resolution": args.resolution, "batch_size": list(MEMORY_BATCHES) if args.memory else args.batch_size,
               "steps": args.steps, **figures}
    summary = (f"diffusers example loop: {figures['baseline_images_per_s']:.1f} images/s "
               f"(latents precomputed: {figures['baseline_precomputed_images_per_s']:.1f}) | ldm trainer: "
               f"{figures['ours_images_per_s']:.1f} images/s | ratio {figures['ratio']:.2f}x") if "ratio" in figures else None
    return report(figures, summary, args.json)


if __name__ == "__main__":
    main()
