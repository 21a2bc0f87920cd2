"""The training-time diffusion process: noise schedule, targets, SNR, loss weights.

The schedule is a diffusers DDPMScheduler config; the same config is saved with the pipeline,
and every sampler is built from it (`ldm.sampling.make_scheduler`), so a model is always
sampled with the schedule, prediction type and spacing it was trained with.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from diffusers import DDPMScheduler

from ldm.config import require
from ldm.losses import min_snr_weight


@dataclasses.dataclass
class NoiseConfig:
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085           # SD's values
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False       # Lin et al. 2024: rescale betas so alpha_bar_T = 0 (needs v-prediction)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"  # sampling spacing; trailing with zero SNR
    snr_gamma: float = 0.0                # min-SNR-gamma weighting (Hang et al. 2023); 0 disables, 5 is typical
    noise_offset: float = 0.0             # std of a per-channel constant added to the noise (Guttenberg 2023)

    def validate(self) -> None:
        require(self.num_train_timesteps >= 2, "noise.num_train_timesteps must be >= 2")
        require(self.snr_gamma >= 0, "noise.snr_gamma must be >= 0")
        require(self.noise_offset >= 0, "noise.noise_offset must be >= 0")
        if self.zero_terminal_snr:
            require(self.prediction_type == "v_prediction",
                    "noise.zero_terminal_snr needs noise.prediction_type=v_prediction: with zero SNR at t=T "
                    "an epsilon model cannot recover x0 from pure noise (Lin et al. 2024, sec. 3.2)")
            require(self.timestep_spacing == "trailing",
                    "noise.zero_terminal_snr needs noise.timestep_spacing=trailing, so sampling starts at t=T")


def scheduler_config(cfg: NoiseConfig) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type, clip_sample=False,
        timestep_spacing=cfg.timestep_spacing, rescale_betas_zero_snr=cfg.zero_terminal_snr,
        steps_offset=1 if cfg.timestep_spacing == "leading" else 0,
    )


def make_train_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    return DDPMScheduler.from_config(scheduler_config(cfg))


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t)."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def noised_inputs(scheduler: DDPMScheduler, cfg: NoiseConfig, latents: torch.Tensor, generator: torch.Generator | None = None):
    """(noisy latents, timesteps, regression target, per-sample loss weights or None)."""
    noise = sample_noise(latents, cfg.noise_offset, generator)
    t = torch.randint(0, cfg.num_train_timesteps, (latents.shape[0],), device=latents.device, generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    if cfg.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022)
    else:
        target = noise
    weights = None
    if cfg.snr_gamma:
        s = snr(scheduler, t)
        weights = min_snr_weight(s, cfg.snr_gamma, cfg.prediction_type)
        if cfg.zero_terminal_snr:
            weights = torch.where(s == 0, torch.ones_like(weights), weights)  # t = T: v = -x0, weight 1
    return noisy, t, target, weights
