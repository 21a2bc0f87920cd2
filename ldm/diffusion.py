"""The training-time diffusion process: noise schedule, targets, SNR, loss weights.

The schedule is a diffusers DDPMScheduler config; the same config is saved with the pipeline,
and every sampler is built from it (`ldm.sampling.make_scheduler`), so a model is always
sampled with the schedule, prediction type and spacing it was trained with.

Stage 3 reads its `noise` section as a `TrainNoiseConfig`, whose schedule keys may be left
unset: they then come from the scheduler of the model being fine-tuned (`fill_schedule`), so a
fine-tune of an SD-2.1-v checkpoint trains v-prediction without the user saying so.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ldm.config import ConfigError, require
from ldm.losses import min_snr_weight

Generators = torch.Generator | list[torch.Generator] | None  # a list: item i of each draw from generator i

PredictionType = Literal["epsilon", "v_prediction"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]


@dataclasses.dataclass
class NoiseConfig:
    prediction_type: PredictionType = "epsilon"  # epsilon, or v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022)
    beta_schedule: BetaSchedule = "scaled_linear"  # squaredcos_cap_v2 is the cosine schedule (Nichol & Dhariwal 2021)
    beta_start: float = 0.00085           # SD's values (linear and scaled_linear only)
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False       # Lin et al. 2024: rescale betas so alpha_bar_T = 0 (needs v-prediction)
    timestep_spacing: TimestepSpacing = "leading"  # sampling spacing; trailing with zero SNR
    snr_gamma: float = 0.0                # min-SNR-gamma weighting (Hang et al. 2023); 0 disables, 5 is typical
    noise_offset: float = 0.0             # std of a per-channel constant added to the noise (Guttenberg 2023); ~0.05

    def validate(self) -> None:
        require(self.num_train_timesteps >= 2, "noise.num_train_timesteps must be >= 2")
        require(0 < self.beta_start < self.beta_end < 1, f"noise.beta_start ({self.beta_start}) and noise.beta_end "
                f"({self.beta_end}) must satisfy 0 < beta_start < beta_end < 1")
        require(self.snr_gamma >= 0, "noise.snr_gamma must be >= 0")
        require(self.noise_offset >= 0, "noise.noise_offset must be >= 0")
        if self.zero_terminal_snr:
            require(self.prediction_type == "v_prediction",
                    "noise.zero_terminal_snr needs noise.prediction_type=v_prediction: with zero SNR at t=T "
                    "an epsilon model cannot recover x0 from pure noise (Lin et al. 2024, sec. 3.2)")
            require(self.timestep_spacing == "trailing",
                    "noise.zero_terminal_snr needs noise.timestep_spacing=trailing, so sampling starts at t=T")


# NoiseConfig's schedule fields and the diffusers scheduler config keys that carry them.
SCHEDULE_KEYS: dict[str, str] = {
    "prediction_type": "prediction_type", "beta_schedule": "beta_schedule", "beta_start": "beta_start",
    "beta_end": "beta_end", "num_train_timesteps": "num_train_timesteps",
    "zero_terminal_snr": "rescale_betas_zero_snr", "timestep_spacing": "timestep_spacing",
}


@dataclasses.dataclass
class TrainNoiseConfig(NoiseConfig):
    """Stage 3's noise section: a schedule key left unset (null) is filled by `fill_schedule`."""

    prediction_type: PredictionType | None = None
    beta_schedule: BetaSchedule | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    num_train_timesteps: int | None = None
    zero_terminal_snr: bool | None = None
    timestep_spacing: TimestepSpacing | None = None


def schedule_of(scheduler_cfg: dict, source: str) -> dict:
    """The NoiseConfig schedule fields a diffusers scheduler config fixes (the inverse of
    `scheduler_config`); keys it lacks are left out. `source` names it in errors."""
    if scheduler_cfg.get("trained_betas") is not None:
        raise ConfigError(f"{source}: the scheduler lists explicit trained_betas, which a noise config cannot "
                          "express; set every noise.* schedule key in the config")
    found = {name: scheduler_cfg[key] for name, key in SCHEDULE_KEYS.items() if key in scheduler_cfg}
    for name, allowed in (("prediction_type", PredictionType), ("beta_schedule", BetaSchedule),
                          ("timestep_spacing", TimestepSpacing)):
        if name in found and found[name] not in get_args(allowed):
            raise ConfigError(f"{source}: the scheduler's {name}={found[name]!r} is not one stage 3 trains "
                              f"({', '.join(get_args(allowed))}); set noise.{name} in the config")
    return found


def fill_schedule(cfg: TrainNoiseConfig, pretrained: dict | None) -> dict[str, str]:
    """Fill the unset schedule keys of `cfg`: from `pretrained` (the `schedule_of` a fine-tuned
    model's scheduler), else NoiseConfig's defaults. Returns {key: "pretrained" | "default"}."""
    taken = {}
    for name in SCHEDULE_KEYS:
        if getattr(cfg, name) is None:
            from_pretrained = pretrained is not None and name in pretrained
            value = pretrained[name] if from_pretrained else NoiseConfig.__dataclass_fields__[name].default
            setattr(cfg, name, value)
            taken[name] = "pretrained" if from_pretrained else "default"
    return taken


def scheduler_config(cfg: NoiseConfig) -> dict:
    """The DDPMScheduler config of this schedule; saved with the pipeline, and every sampler is built from it."""
    return dict(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type, clip_sample=False,
        timestep_spacing=cfg.timestep_spacing, rescale_betas_zero_snr=cfg.zero_terminal_snr,
        # SD's value: leading spacing ends at t=1, not 0. The other spacings ignore it, and diffusers'
        # SD pipelines rewrite any other value on load, with a warning.
        steps_offset=1,
    )


def make_train_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    return DDPMScheduler.from_config(scheduler_config(cfg))


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t)."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: Generators = None) -> torch.Tensor:
    """N(0, I) noise shaped like `latents`, plus, with `noise_offset`, one N(0, offset^2) constant
    per image and channel (Guttenberg 2023): the zero-frequency component that plain noise
    barely destroys, so the model learns to change an image's mean brightness and colour."""
    noise = _randn(latents.shape, generator, latents)
    if noise_offset:
        noise = noise + noise_offset * _randn((*latents.shape[:2], 1, 1), generator, latents)
    return noise


def _randn(shape, generator: Generators, like: torch.Tensor) -> torch.Tensor:
    """Drawn on the generator's device (the CPU in training, so draws do not depend on the GPU), then
    moved; with a list of generators, item i from generator i (diffusers' randn_tensor)."""
    return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype)


def _timesteps(high: int, generator: Generators, like: torch.Tensor) -> torch.Tensor:
    """One timestep per item, uniform in [0, high), drawn as `_randn` draws."""
    if isinstance(generator, list):
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=g.device) for g in generator]).to(like.device)
    device = generator.device if generator is not None else like.device
    return torch.randint(0, high, (like.shape[0],), device=device, generator=generator).to(like.device)


def noised_inputs(scheduler: DDPMScheduler, cfg: NoiseConfig, latents: torch.Tensor, generator: Generators = None):
    """(noisy latents, timesteps, regression target, per-sample loss weights or None)."""
    noise = sample_noise(latents, cfg.noise_offset, generator)
    t = _timesteps(cfg.num_train_timesteps, generator, latents)
    noisy = scheduler.add_noise(latents, noise, t)  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    if cfg.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)  # v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022)
    else:
        target = noise
    weights = None
    if cfg.snr_gamma:
        s = snr(scheduler, t)
        weights = min_snr_weight(s, cfg.snr_gamma, cfg.prediction_type)
        if cfg.zero_terminal_snr:
            weights = torch.where(s == 0, torch.ones_like(weights), weights)  # t = T: v = -x0, weight 1
    return noisy, t, target, weights
