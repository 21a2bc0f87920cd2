"""Stage 3: train the text-conditioned U-Net on the latent cache; export a diffusers pipeline.

Output (`<out_dir>/`): `pipeline/` (StableDiffusionPipeline.save_pretrained: vae, unet with the
EMA weights, text_encoder, tokenizer, scheduler with the training schedule, and `ldm.json`
recording how it was trained), `samples/step-N.png` validation grids, `metrics.jsonl`,
`config.yaml`, `checkpoints/step-N/` for resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ldm.config import require, to_dict
from ldm.data.cache import LatentCache, open_cache, text_identity
from ldm.data.captions import CaptionConfig, process_caption
from ldm.data.images import image_grid
from ldm.diffusion import NoiseConfig, make_train_scheduler, noised_inputs, scheduler_config
from ldm.losses import diffusion_loss
from ldm.models.conditioning import TextEncoderConfig, load_text
from ldm.models.unet import UNetModelConfig, build_unet
from ldm.models.vae import load_vae, weights_hash
from ldm.sampling import decode_latents, denoise, initial_noise, make_scheduler, seeded_generators
from ldm.models.text import encode_prompts
from ldm.train.common import (register_schedule, LoopConfig, NonFiniteGuard, batch_indices, load_checkpoint, lr_lambda, make_accelerator,
                              make_optimizer, resolve_resume, save_checkpoint, start_run)
from ldm.train.vae import swapped_ema


@dataclasses.dataclass
class ValidationConfig:
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a large red circle in the center, on a white background"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3])  # one image per prompt and seed
    steps: int = 25                 # sampling steps
    guidance_scale: float = 4.0
    scheduler: str = "dpm++2m"
    held_out_batches: int = 4       # batches of held-out latents for the validation loss (fixed noise and t)


@dataclasses.dataclass
class LDMTrainConfig:
    out_dir: str = "runs/ldm"          # run directory; the pipeline lands in <out_dir>/pipeline
    resume: str = "latest"             # "latest" (re-running the same command resumes), "" or a checkpoint path
    cache: str = "runs/latents"        # latent cache (stage 2 output)
    vae: str = "runs/vae/vae"          # the VAE the cache was encoded with (checked by weight hash), exported with the pipeline
    model: UNetModelConfig = dataclasses.field(default_factory=UNetModelConfig)
    text: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    noise: NoiseConfig = dataclasses.field(default_factory=NoiseConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    caption_dropout: float = 0.1       # probability of training on the empty prompt (classifier-free guidance)
    latent_sample: Literal["sample", "mode"] = "sample"  # draw z ~ q(z|x) each time, or use its mean
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    sample_scheduler: str = "dpm++2m"  # the scheduler saved as the pipeline's default

    def validate(self) -> None:
        require(0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        require(Path(self.cache).is_dir(), f"cache: no latent cache directory {self.cache!r} (run the encode stage first)")
        require(Path(self.vae).is_dir(), f"vae: no such VAE directory {self.vae!r}")


def train_ldm(cfg: LDMTrainConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    loop = cfg.train
    accelerator = make_accelerator(loop, out_dir)
    log = start_run(accelerator, cfg, out_dir, "ldm")
    torch.manual_seed(loop.seed)
    device = accelerator.device

    # --- data: the latent cache must come from this VAE
    vae = load_vae(cfg.vae)
    cache = open_cache(cfg.cache, "train", expect={"vae_hash": weights_hash(vae)})
    held_out = open_cache(cfg.cache, "eval")
    groups = cache.size_groups()
    require(len(groups) == 1, "bucketed caches need the bucket sampler (one latent size per batch)")
    latent_size = next(iter(groups)).split("x")

    # --- models: frozen text encoder, U-Net (fresh or fine-tuned), EMA
    text_encoder, tokenizer = load_text(cfg.text)
    text_encoder.to(device)
    unet = build_unet(cfg.model, cache.manifest["latent_channels"], int(latent_size[0]), text_encoder.config.hidden_size)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    noise_scheduler = make_train_scheduler(cfg.noise)
    optimizer = make_optimizer(unet.parameters(), loop, use_8bit=cfg.use_8bit_adam)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(loop))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    register_schedule(accelerator, lr_sched)
    ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=loop.ema_decay, use_ema_warmup=loop.ema_warmup) if loop.ema_decay else None
    if ema is not None:
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    empty = encode_prompts(text_encoder, tokenizer, [""], clip_skip=cfg.text.clip_skip)
    use_cached_text = cache.text_matches(text_identity(text_encoder, tokenizer, cfg.text.clip_skip))

    step = 0
    resume_from = resolve_resume(out_dir, cfg.resume)
    if resume_from is not None:
        step = load_checkpoint(accelerator, resume_from)["step"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = batch_indices(len(cache), loop.batch_size, loop.seed, step * loop.grad_accum, rank, world)
    guard = NonFiniteGuard(loop.max_nonfinite_steps)

    progress = tqdm(total=loop.steps, initial=step, desc="unet", disable=not accelerator.is_local_main_process)
    while step < loop.steps:
        for _ in range(loop.grad_accum):
            indices = next(batches)
            # every random draw of this micro-batch comes from a generator fixed by (seed, step, rank)
            gen = torch.Generator().manual_seed(hash((loop.seed, step, len(indices), rank)) % 2**63)
            latents = cache.latents(indices, generator=gen, mode=cfg.latent_sample == "mode").to(device)
            cond = conditioning(cfg, cache, indices, text_encoder, tokenizer, empty, gen, use_cached_text)
            noisy, t, target, weights = noised_inputs(noise_scheduler, cfg.noise, latents, gen)
            with accelerator.accumulate(unet):
                pred = unet(noisy, t.to(device), encoder_hidden_states=cond, return_dict=False)[0]
                loss = diffusion_loss(pred, target, weights)
                if guard.ok(loss):
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and loop.max_grad_norm:
                        accelerator.clip_grad_norm_(unet.parameters(), loop.max_grad_norm)
                    optimizer.step()
                    lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        progress.update(1)
        if step % loop.log_every == 0 or step == loop.steps:
            progress.set_postfix(loss=f"{loss.item():.4f}")
            log.write(step, loss=loss.item(), lr=lr_sched.get_last_lr()[0], skipped=guard.total)
        if loop.eval_every and step % loop.eval_every == 0 and step < loop.steps and accelerator.is_main_process:
            with swapped_ema(ema, accelerator.unwrap_model(unet)):
                validate_ldm(cfg, accelerator.unwrap_model(unet), vae, text_encoder, tokenizer, held_out, noise_scheduler, out_dir, step, log)
        if loop.save_every and step % loop.save_every == 0 and step < loop.steps:
            save_checkpoint(accelerator, out_dir, step, loop.checkpoints_total_limit)
    progress.close()
    save_checkpoint(accelerator, out_dir, step, loop.checkpoints_total_limit)

    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(final.parameters())
        final.eval()
        validate_ldm(cfg, final, vae, text_encoder, tokenizer, held_out, noise_scheduler, out_dir, step, log)
        export_pipeline(cfg, final, vae, text_encoder, tokenizer, out_dir / "pipeline")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir / "pipeline"


def conditioning(cfg: LDMTrainConfig, cache: LatentCache, indices: list[int], text_encoder, tokenizer,
                 empty: torch.Tensor, gen: torch.Generator, use_cached_text: bool = False) -> torch.Tensor:
    """Text embeddings for a batch, with classifier-free caption dropout.

    important: caption dropout happens here, not in the dataset, so it works the same with
    cached text embeddings; a dropped caption gets the embedding of the empty prompt, which is
    exactly the unconditional input the sampler uses for guidance.
    """
    import random

    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    prompts = [process_caption(cache.captions[i], cfg.captions, rng) for i in indices]
    cond = cache.text_embeddings(prompts) if use_cached_text else None  # None when a prompt was altered
    if cond is None:
        with torch.no_grad():
            cond = encode_prompts(text_encoder, tokenizer, prompts, clip_skip=cfg.text.clip_skip)
    cond = cond.to(device=empty.device, dtype=empty.dtype)
    drop = torch.rand(len(indices), generator=gen) < cfg.caption_dropout
    return torch.where(drop[:, None, None].to(cond.device), empty.expand_as(cond), cond)


@torch.no_grad()
def validate_ldm(cfg: LDMTrainConfig, unet, vae, text_encoder, tokenizer, held_out: LatentCache, noise_scheduler, out_dir: Path, step: int, log) -> None:
    """Held-out loss (fixed noise and timesteps) and a grid for the config's prompts and seeds."""
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    val = cfg.validation
    losses = []
    gen = torch.Generator().manual_seed(1234)
    bs = cfg.train.batch_size
    for b in range(min(val.held_out_batches, len(held_out) // bs)):
        indices = list(range(b * bs, (b + 1) * bs))
        latents = held_out.latents(indices, generator=gen).to(device)
        prompts = [c[0] for c in (held_out.captions[i] for i in indices)]
        cond = encode_prompts(text_encoder, tokenizer, prompts, clip_skip=cfg.text.clip_skip)
        noisy, t, target, _ = noised_inputs(noise_scheduler, cfg.noise, latents, gen)
        pred = unet(noisy, t.to(device), encoder_hidden_states=cond, return_dict=False)[0]
        losses.append(torch.mean((pred.float() - target.float()) ** 2).item())
    if val.prompts and val.seeds:
        images = sample_grid(unet, vae.to(device), text_encoder, tokenizer, cfg, val.prompts, val.seeds)
        (out_dir / "samples").mkdir(exist_ok=True)
        image_grid(images * 2 - 1, nrow=len(val.seeds)).save(out_dir / "samples" / f"step-{step:06d}.png")
    log.write(step, **({"val_loss": sum(losses) / len(losses)} if losses else {}))
    unet.train(was_training)


def sample_grid(unet, vae, text_encoder, tokenizer, cfg: LDMTrainConfig, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    val = cfg.validation
    scheduler = make_scheduler(val.scheduler, scheduler_config(cfg.noise))
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    cond = encode_prompts(text_encoder, tokenizer, all_prompts, clip_skip=cfg.text.clip_skip)
    uncond = encode_prompts(text_encoder, tokenizer, [""] * len(all_prompts), clip_skip=cfg.text.clip_skip)
    size = unet.config.sample_size
    generators = seeded_generators(all_seeds)
    noise = initial_noise((len(all_prompts), unet.config.in_channels, size, size), generators, cond.device, cond.dtype)
    latents = denoise(unet, scheduler, cond, uncond, noise, num_steps=val.steps, guidance_scale=val.guidance_scale, generator=generators)
    return decode_latents(vae, latents).cpu()


def export_pipeline(cfg: LDMTrainConfig, unet, vae, text_encoder, tokenizer, path: Path) -> None:
    """A StableDiffusionPipeline directory that diffusers loads as it is, plus `ldm.json`."""
    scheduler = make_scheduler(cfg.sample_scheduler, scheduler_config(cfg.noise))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    info = {
        "format": "ldm-pipeline", "version": 1,
        "caption_dropout": cfg.caption_dropout,
        "noise": to_dict(cfg.noise),
        "clip_skip": cfg.text.clip_skip,
        "training_scheduler": scheduler_config(cfg.noise),
        "resolution": unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1),
        "validation": to_dict(cfg.validation),
        "train_config": to_dict(cfg),
    }
    (path / "ldm.json").write_text(json.dumps(info, indent=2))
