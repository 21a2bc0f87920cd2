"""Sampling: schedulers by short name, and the guided denoising loop written out once.

Every scheduler is built from the pipeline's saved training schedule (`from_config`), so the
prediction type, betas and spacing a model was trained with carry over to whichever sampler a
user picks. `denoise()` is the loop of diffusers' StableDiffusionPipeline (same random draws,
same guidance, same scheduler calls), so for the same seed it gives the same image; it adds
img2img (start from a noised image), inpainting (re-impose the known region at each step,
Lugmayr et al. 2022 style "blended" sampling for non-inpainting models) and the trajectory.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSDEScheduler, DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                       KDPM2DiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor

# name -> (scheduler class, config overrides, one-line description)
SCHEDULERS: dict[str, tuple[type, dict, str]] = {
    "ddpm": (DDPMScheduler, {}, "ancestral DDPM (Ho et al. 2020)"),
    "ddim": (DDIMScheduler, {}, "DDIM, eta=0 deterministic (Song et al. 2021)"),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}, "PLMS / pseudo linear multistep (Liu et al. 2022)"),
    "lms": (LMSDiscreteScheduler, {}, "k-diffusion linear multistep (Karras et al. 2022)"),
    "euler": (EulerDiscreteScheduler, {}, "Euler, Karras et al. 2022 algorithm 2 without churn"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler ancestral (k-diffusion)"),
    "heun": (HeunDiscreteScheduler, {}, "Heun 2nd order (Karras et al. 2022 algorithm 1)"),
    "kdpm2": (KDPM2DiscreteScheduler, {}, "DPM-Solver-2 (k-diffusion)"),
    "kdpm2_a": (KDPM2AncestralDiscreteScheduler, {}, "DPM-Solver-2 ancestral (k-diffusion)"),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM-Solver++(2M) (Lu et al. 2022)"),
    "dpm++2m_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, "DPM-Solver++(2M), Karras sigmas"),
    "dpm++2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "DPM-Solver++(2M) SDE"),
    "dpm++sde": (DPMSolverSDEScheduler, {}, "DPM-Solver++ SDE (k-diffusion; needs torchsde)"),
    "dpm++2s": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++"}, "DPM-Solver++(2S) singlestep"),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC (Zhao et al. 2023)"),
    "deis": (DEISMultistepScheduler, {}, "DEIS multistep (Zhang & Chen 2023)"),
}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config: dict):
    """A scheduler by short name, configured from the model's training schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    cls, overrides, _ = SCHEDULERS[name]
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    if name == "dpm++sde":
        try:
            import torchsde  # noqa: F401
        except ImportError as err:
            raise ImportError("scheduler dpm++sde needs torchsde: pip install torchsde") from err
    return cls.from_config({**config, **overrides})


@dataclasses.dataclass
class GenerationResult:
    images: torch.Tensor                     # (B, 3, H, W) in [0, 1]
    latents: torch.Tensor                    # final latents (scaled)
    trajectory: list[tuple[int, torch.Tensor, torch.Tensor]]  # (t, x_t image, predicted x0 image), if asked


def encode_text(text_encoder, tokenizer, prompts: list[str], clip_skip: int = 0) -> torch.Tensor:
    """Prompt embeddings the way diffusers' StableDiffusionPipeline.encode_prompt computes them."""
    from ldm.models.text import encode_prompts

    return encode_prompts(text_encoder, tokenizer, prompts, clip_skip=clip_skip, device=text_encoder.device)


def rescale_cfg(noise_cfg: torch.Tensor, noise_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, sec. 3.4): match the std of the text-conditioned prediction."""
    std_text = noise_text.std(dim=list(range(1, noise_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def denoise(
    unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor | None, latents: torch.Tensor, *,
    num_steps: int, guidance_scale: float = 7.5, guidance_rescale: float = 0.0, generator=None, eta: float = 0.0,
    strength: float = 1.0, init_latents: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The reverse process: classifier-free guided steps from noise (or a noised image) to x_0.

    `latents` is the initial Gaussian noise (unscaled by sigma). For img2img, `init_latents`
    (the encoded image, scaled) is noised to the first timestep kept by `strength`. For
    inpainting, `mask` (1 = regenerate, latent size) keeps the known region equal to the
    image noised to the current level, so only the masked part is generated.
    One batched forward evaluates the unconditional and conditional predictions together.
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
    timesteps = scheduler.timesteps
    if init_latents is not None and strength < 1.0:
        keep = min(int(num_steps * strength), num_steps)
        t_start = max(num_steps - keep, 0)
        timesteps = timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
    noise = latents
    if init_latents is not None and (strength < 1.0 or mask is not None):
        first = timesteps[:1].repeat(latents.shape[0])
        x = scheduler.add_noise(init_latents, noise, first) if strength < 1.0 else noise * scheduler.init_noise_sigma
    else:
        x = noise * scheduler.init_noise_sigma
    guided = uncond is not None and guidance_scale > 1.0
    embeddings = torch.cat([uncond, cond]) if guided else cond
    extra = _step_kwargs(scheduler, generator, eta)
    for i, t in enumerate(timesteps):
        model_in = torch.cat([x] * 2) if guided else x
        model_in = scheduler.scale_model_input(model_in, t)
        pred = unet(model_in, t, encoder_hidden_states=embeddings, return_dict=False)[0]
        if guided:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)
            if guidance_rescale > 0:
                pred = rescale_cfg(pred, pred_text, guidance_rescale)
        out = scheduler.step(pred, t, x, **extra, return_dict=True)
        x = out.prev_sample
        if mask is not None and init_latents is not None:
            # blended inpainting: outside the mask, the image itself at the next noise level
            if i + 1 < len(timesteps):
                known = scheduler.add_noise(init_latents, noise, timesteps[i + 1 : i + 2].repeat(x.shape[0]))
            else:
                known = init_latents
            x = mask * x + (1 - mask) * known
        if callback is not None:
            x0 = getattr(out, "pred_original_sample", None)
            callback(i, int(t), x, x0 if x0 is not None else x)
    return x


def initial_noise(batch: int, channels: int, height: int, width: int, seeds: list[int] | None, device, dtype) -> tuple[torch.Tensor, list[torch.Generator] | None]:
    """Per-image seeded noise, drawn exactly as diffusers' pipelines draw it (randn_tensor)."""
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds] if seeds is not None else None
    noise = randn_tensor((batch, channels, height, width), generator=generators, device=torch.device(device), dtype=dtype)
    return noise, generators


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (undoing the stored scale and shift)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents / vae.config.scaling_factor + shift
    images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_images(vae, images: torch.Tensor, generator=None) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents (a posterior sample, as diffusers' img2img does)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = (images * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(x).latent_dist.sample(generator=generator)
    return (z - shift) * vae.config.scaling_factor
