"""Inference: load any Stable Diffusion-style pipeline and generate images (CLI and API).

    pipe = ldm.load_pipeline("runs/demo/ldm")          # our run dir, an SD diffusers dir, or a .safetensors file
    images = ldm.generate(pipe, ["a large red circle on the left"], seeds=[0], scheduler="dpm++2m")

Loads our run directory (its `pipeline/`), any SD-1.x/2.x diffusers directory, or an original
single-file checkpoint. Each PNG carries its prompt, seed, scheduler, steps and guidance in
PNG text chunks, so an image says how to make it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.sampling import (SCHEDULERS, decode_latents, denoise, encode_images, encode_text, initial_noise,
                          make_scheduler)


@dataclasses.dataclass
class Pipeline:
    """The components a sampler needs; `base_scheduler_config` is the training schedule."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    base_scheduler_config: dict
    default_scheduler: str = "dpm++2m"
    clip_skip: int = 0
    path: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * self.vae_factor


def auto_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def auto_dtype(device: str) -> torch.dtype:
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


_SCHEDULER_NAMES = {cls.__name__: name for name, (cls, overrides, _) in SCHEDULERS.items() if not overrides}


def resolve_pipeline_dir(path: str | Path) -> Path:
    path = Path(path)
    if (path / "pipeline" / "model_index.json").exists():
        return path / "pipeline"
    return path


def load_pipeline(path: str | Path, device: str | None = None, dtype: torch.dtype | str | None = None,
                  attention: str = "sdpa", allow_pickle: bool = False) -> Pipeline:
    """Our run dir / pipeline dir, an SD diffusers dir, or an original single-file checkpoint."""
    from diffusers import StableDiffusionPipeline

    device = device or auto_device()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or auto_dtype(device))
    path = resolve_pipeline_dir(path)
    if path.is_file():
        from ldm.export import import_single_file

        sd = import_single_file(path, allow_pickle=allow_pickle)
    elif (path / "model_index.json").exists():
        sd = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    else:
        raise FileNotFoundError(f"{path}: not a run dir, a diffusers pipeline dir (model_index.json) or a checkpoint file")
    info = json.loads((path / "ldm.json").read_text()) if path.is_dir() and (path / "ldm.json").exists() else {}
    base = dict(info.get("training_scheduler") or sd.scheduler.config)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.to(device=device, dtype=dtype).eval()
    if attention == "xformers":
        sd.unet.enable_xformers_memory_efficient_attention()
    return Pipeline(unet=sd.unet, vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                    base_scheduler_config=base, default_scheduler=_SCHEDULER_NAMES.get(type(sd.scheduler).__name__, "dpm++2m"),
                    clip_skip=int(info.get("clip_skip", 0)), path=str(path))


def _load_image(image, width: int, height: int, mode: str = "RGB") -> torch.Tensor:
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    image = image.convert(mode).resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] if mode == "RGB" else torch.from_numpy(arr)[None, None]


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str], *, negative_prompts: list[str] | None = None, seeds: list[int] | None = None,
             scheduler: str | None = None, steps: int = 25, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
             width: int | None = None, height: int | None = None, batch_size: int = 4, eta: float = 0.0,
             init_image=None, strength: float = 0.8, mask_image=None, trajectory_every: int = 0) -> list[dict]:
    """Images for `prompts` (one per prompt, seed i for prompt i); img2img with `init_image`,
    inpainting with `init_image` + `mask_image` (white = regenerate).

    Returns one dict per image: {"image": PIL, "prompt", "seed", "scheduler", "steps",
    "guidance_scale", "trajectory": [(t, x_t PIL, predicted x0 PIL)] when asked}.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    scheduler = scheduler or pipe.default_scheduler
    width, height = width or pipe.native_size, height or pipe.native_size
    f = pipe.vae_factor
    if width % f or height % f:
        raise ValueError(f"width and height must be multiples of the VAE factor {f}, got {width}x{height}")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    negative_prompts = negative_prompts or [""] * len(prompts)
    dtype = next(pipe.unet.parameters()).dtype
    results = []
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        batch_prompts, batch_seeds = prompts[sl], seeds[sl]
        cond = encode_text(pipe.text_encoder, pipe.tokenizer, batch_prompts, pipe.clip_skip)
        uncond = encode_text(pipe.text_encoder, pipe.tokenizer, negative_prompts[sl], pipe.clip_skip) if guidance_scale > 1 else None
        sched = make_scheduler(scheduler, pipe.base_scheduler_config)
        noise, generators = initial_noise(len(batch_prompts), pipe.unet.config.in_channels, height // f, width // f,
                                          batch_seeds, pipe.device, dtype)
        init_latents = mask = None
        if init_image is not None:
            image = _load_image(init_image, width, height).to(pipe.device).expand(len(batch_prompts), -1, -1, -1)
            init_latents = encode_images(pipe.vae, image, generator=generators[0] if generators else None).to(dtype)
        if mask_image is not None:
            m = _load_image(mask_image, width // f, height // f, mode="L").to(pipe.device, dtype)
            mask = (m > 0.5).to(dtype)
        trajectory = []

        def record(i, t, x, x0):
            if trajectory_every and (i % trajectory_every == 0):
                trajectory.append((t, decode_latents(pipe.vae, x), decode_latents(pipe.vae, x0)))

        latents = denoise(pipe.unet, sched, cond, uncond, noise, num_steps=steps, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, generator=generators, eta=eta,
                          strength=strength if init_image is not None and mask_image is None else 1.0,
                          init_latents=init_latents, mask=mask, callback=record if trajectory_every else None)
        images = decode_latents(pipe.vae, latents).cpu()
        for j, img in enumerate(images):
            results.append({
                "image": to_pil(img), "prompt": batch_prompts[j], "negative_prompt": negative_prompts[start + j],
                "seed": batch_seeds[j], "scheduler": scheduler, "steps": steps, "guidance_scale": guidance_scale,
                "guidance_rescale": guidance_rescale, "width": width, "height": height,
                "trajectory": [(t, to_pil(xt[j].cpu()), to_pil(x0[j].cpu())) for t, xt, x0 in trajectory],
            })
    return results


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL, rounded as diffusers' image processor does."""
    arr = (image.float().permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def save_with_metadata(result: dict, path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    for key in ("prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance_scale", "guidance_rescale", "width", "height"):
        info.add_text(key, str(result[key]))
    info.add_text("parameters", json.dumps({k: result[k] for k in ("prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance_scale")}))
    result["image"].save(path, pnginfo=info)


def save_trajectory(result: dict, stem: Path) -> None:
    """The denoising trajectory: a strip (x_t above, predicted x0 below) and a GIF of x_t."""
    from ldm.data.images import image_grid

    frames = [xt for _, xt, _ in result["trajectory"]] + [result["image"]]
    preds = [x0 for _, _, x0 in result["trajectory"]] + [result["image"]]
    image_grid(frames + preds, nrow=len(frames)).save(stem.with_name(stem.name + "-trajectory.png"))
    frames[0].save(stem.with_name(stem.name + "-trajectory.gif"), save_all=True, append_images=frames[1:], duration=150, loop=0)


def read_prompts(args) -> list[dict]:
    """Prompts from --prompt (repeatable) or --prompts FILE (.txt: one per line; .jsonl: per-prompt settings)."""
    items = [{"prompt": p} for p in (args.prompt or [])]
    if args.prompts:
        path = Path(args.prompts)
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            items.append(json.loads(line) if path.suffix == ".jsonl" else {"prompt": line.strip()})
    if not items:
        raise SystemExit("give at least one --prompt or a --prompts file")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Text-to-image (and img2img, inpainting) with a Stable Diffusion-style pipeline.")
    p.add_argument("model", nargs="?", help="run dir, pipeline dir, SD diffusers dir or single-file .safetensors")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="file: one prompt per line, or .jsonl with prompt/negative_prompt/seed/steps/guidance_scale")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--scheduler", help="sampler short name (see --list-schedulers); default: the pipeline's")
    p.add_argument("--list-schedulers", action="store_true")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--init-image", help="img2img / inpainting source image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much of the image to re-noise (0..1)")
    p.add_argument("--mask", help="inpainting mask (white = regenerate)")
    p.add_argument("--device", help="cuda | mps | cpu (default: auto)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa")
    p.add_argument("--trajectory", type=int, default=0, help="save the denoising trajectory every N steps (strip + GIF)")
    p.add_argument("--out", default="outputs", help="output directory")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a pickled .ckpt (weights_only)")
    return p


def main(argv=None) -> None:
    from ldm.data.images import image_grid

    args = build_parser().parse_args(argv)
    if args.list_schedulers:
        for name, (cls, _, description) in SCHEDULERS.items():
            print(f"{name:16s} {cls.__name__:36s} {description}")
        return
    if not args.model:
        raise SystemExit("give a model path (run dir, pipeline dir, SD dir or .safetensors)")
    pipe = load_pipeline(args.model, args.device, args.dtype, args.attention, args.allow_pickle)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    seed = args.seed
    for item in read_prompts(args):
        for _ in range(item.get("num_images", args.num_images)):
            results += generate(
                pipe, [item["prompt"]], negative_prompts=[item.get("negative_prompt", args.negative_prompt)],
                seeds=[item.get("seed", seed)], scheduler=item.get("scheduler", args.scheduler),
                steps=item.get("steps", args.steps), guidance_scale=item.get("guidance_scale", args.guidance_scale),
                guidance_rescale=item.get("guidance_rescale", args.guidance_rescale), width=args.width, height=args.height,
                init_image=args.init_image, strength=args.strength, mask_image=args.mask, trajectory_every=args.trajectory,
            )
            seed += 1
    for i, r in enumerate(results):
        stem = out / f"{i:04d}-seed{r['seed']}"
        save_with_metadata(r, stem.with_suffix(".png"))
        if r["trajectory"]:
            save_trajectory(r, stem)
    image_grid([r["image"] for r in results]).save(out / "grid.png")
    print(f"wrote {len(results)} images and grid.png to {out}")
