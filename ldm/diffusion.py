"""The training-time diffusion process: noise schedule, targets, SNR, loss weights.

The schedule is a diffusers DDPMScheduler config; the same config is saved with the pipeline,
and every sampler is built from it (`ldm.sampling.make_scheduler`), so a model is always
sampled with the schedule, prediction type and spacing it was trained with.

`noise.objective: flow` trains rectified flow instead (Esser et al. 2024, "Scaling Rectified
Flow Transformers", SD3): x_t = (1 - t) x0 + t eps for t in [0, 1], the network predicts the
velocity eps - x0, t is drawn logit-normal or uniform and shifted for resolution. Its schedule is
a FlowMatchEulerDiscreteScheduler config (`shift`, `num_train_timesteps`) marked
`prediction_type: flow_prediction`, diffusers' name for that target; only flow samplers take it.

Stage 3 reads its `noise` section as a `TrainNoiseConfig`, whose schedule keys may be left
unset: they then come from the scheduler of the model being fine-tuned (`fill_schedule`), so a
fine-tune of an SD-2.1-v checkpoint trains v-prediction without the user saying so.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor

from ldm.config import ConfigError, require
from ldm.losses import min_snr_weight

Generators = torch.Generator | list[torch.Generator] | None  # a list: item i of each draw from generator i

PredictionType = Literal["epsilon", "v_prediction"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
Objective = Literal["diffusion", "flow"]
TimestepSampling = Literal["logit_normal", "uniform"]

FLOW_PREDICTION = "flow_prediction"  # diffusers' prediction_type for a velocity eps - x0 (DPM-Solver, UniPC, DEIS)


@dataclasses.dataclass
class NoiseConfig:
    objective: Objective = "diffusion"    # diffusion: the DDPM process of the keys below; flow: rectified flow (SD3)
    prediction_type: PredictionType = "epsilon"  # epsilon, or v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022)
    beta_schedule: BetaSchedule = "scaled_linear"  # squaredcos_cap_v2 is the cosine schedule (Nichol & Dhariwal 2021)
    beta_start: float = 0.00085           # SD's values (linear and scaled_linear only)
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False       # Lin et al. 2024: rescale betas so alpha_bar_T = 0 (needs v-prediction)
    timestep_spacing: TimestepSpacing = "leading"  # sampling spacing; trailing with zero SNR
    snr_gamma: float = 0.0                # min-SNR-gamma weighting (Hang et al. 2023); 0 disables, 5 is typical
    noise_offset: float = 0.0             # std of a per-channel constant added to the noise (Guttenberg 2023); ~0.05
    # objective: flow only (Esser et al. 2024)
    timestep_sampling: TimestepSampling = "logit_normal"  # density of t: logit-normal (sec. 3.1, eq. 19) or uniform
    logit_mean: float = 0.0               # m of the logit-normal: t = sigmoid(u), u ~ N(m, s^2); m > 0 favours noise
    logit_std: float = 1.0                # s of the logit-normal
    shift: float = 1.0                    # t -> shift t / (1 + (shift - 1) t) (eq. 23), in training and sampling;
                                          # sqrt(m / n) for m pixels on n pixels' schedule (SD3: 3 at 1024^2)

    def validate(self) -> None:
        self.validate_objective()
        require(self.num_train_timesteps >= 2, "noise.num_train_timesteps must be >= 2")
        if self.objective == "flow":
            return
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

    def validate_objective(self) -> None:
        """Keys of the other objective, set away from their defaults, are an error naming them: a flow
        model has no betas, epsilon/v target or SNR (min-SNR weights and zero-terminal-SNR are about
        the DDPM process); the flow keys do nothing for diffusion."""
        other = DIFFUSION_ONLY if self.objective == "flow" else FLOW_ONLY
        fields = type(self).__dataclass_fields__
        wrong = [f"noise.{k}={getattr(self, k)}" for k in other if getattr(self, k) != fields[k].default]
        require(not wrong, f"{', '.join(wrong)}: not used with noise.objective={self.objective} "
                           f"({'a DDPM-process key' if self.objective == 'flow' else 'a flow-matching key'}); "
                           "remove it or change noise.objective")
        if self.objective == "flow":
            require(self.shift > 0, f"noise.shift must be > 0, got {self.shift}")
            require(self.logit_std > 0, f"noise.logit_std must be > 0, got {self.logit_std}")


# The keys of one objective that mean nothing to the other.
DIFFUSION_ONLY = ("prediction_type", "beta_schedule", "beta_start", "beta_end", "zero_terminal_snr", "timestep_spacing",
                  "snr_gamma")
FLOW_ONLY = ("timestep_sampling", "logit_mean", "logit_std", "shift")


# NoiseConfig's schedule fields and the diffusers scheduler config keys that carry them.
SCHEDULE_KEYS: dict[str, str] = {
    "prediction_type": "prediction_type", "beta_schedule": "beta_schedule", "beta_start": "beta_start",
    "beta_end": "beta_end", "num_train_timesteps": "num_train_timesteps",
    "zero_terminal_snr": "rescale_betas_zero_snr", "timestep_spacing": "timestep_spacing",
}
# The same for a flow schedule (FlowMatchEulerDiscreteScheduler's keys).
FLOW_SCHEDULE_KEYS: dict[str, str] = {"num_train_timesteps": "num_train_timesteps", "shift": "shift"}


def schedule_keys(objective: str) -> dict[str, str]:
    return FLOW_SCHEDULE_KEYS if objective == "flow" else SCHEDULE_KEYS


def objective_of(scheduler_cfg: dict) -> str:
    """"flow" for a flow-matching scheduler config (ours, a saved FlowMatch* scheduler, or a DPM-Solver,
    UniPC or DEIS on flow sigmas), else "diffusion"."""
    flow = (scheduler_cfg.get("prediction_type") == FLOW_PREDICTION or bool(scheduler_cfg.get("use_flow_sigmas"))
            or str(scheduler_cfg.get("_class_name", "")).startswith("FlowMatch"))
    return "flow" if flow else "diffusion"


@dataclasses.dataclass
class TrainNoiseConfig(NoiseConfig):
    """Stage 3's noise section: a schedule key left unset (null) is filled by `fill_schedule`."""

    objective: Objective | None = None
    prediction_type: PredictionType | None = None
    beta_schedule: BetaSchedule | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    num_train_timesteps: int | None = None
    zero_terminal_snr: bool | None = None
    timestep_spacing: TimestepSpacing | None = None
    shift: float | None = None


def schedule_of(scheduler_cfg: dict, source: str) -> dict:
    """The NoiseConfig schedule fields a diffusers scheduler config fixes (the inverse of
    `scheduler_config`), with its "objective"; keys it lacks are left out. `source` names it in errors."""
    if objective_of(scheduler_cfg) == "flow":
        if scheduler_cfg.get("use_dynamic_shifting"):
            raise ConfigError(f"{source}: the scheduler shifts its timesteps by image size (use_dynamic_shifting, "
                              "as Flux does), which stage 3 does not train; only a fixed noise.shift")
        found = {"objective": "flow", **{k: scheduler_cfg[k] for k in FLOW_SCHEDULE_KEYS.values() if k in scheduler_cfg}}
        if "shift" not in found and "flow_shift" in scheduler_cfg:  # DPM-Solver's and UniPC's name for it
            found["shift"] = scheduler_cfg["flow_shift"]
        return found
    if scheduler_cfg.get("trained_betas") is not None:
        raise ConfigError(f"{source}: the scheduler lists explicit trained_betas, which a noise config cannot "
                          "express; set every noise.* schedule key in the config")
    found = {name: scheduler_cfg[key] for name, key in SCHEDULE_KEYS.items() if key in scheduler_cfg}
    for name, allowed in (("prediction_type", PredictionType), ("beta_schedule", BetaSchedule),
                          ("timestep_spacing", TimestepSpacing)):
        if name in found and found[name] not in get_args(allowed):
            raise ConfigError(f"{source}: the scheduler's {name}={found[name]!r} is not one stage 3 trains "
                              f"({', '.join(get_args(allowed))}); set noise.{name} in the config")
    return {"objective": "diffusion", **found}


def fill_schedule(cfg: TrainNoiseConfig, pretrained: dict | None) -> dict[str, str]:
    """Fill the unset schedule keys of `cfg`: from `pretrained` (the `schedule_of` a fine-tuned
    model's scheduler), else NoiseConfig's defaults. Returns {key: "pretrained" | "default"}.

    The objective comes first (a fine-tune of a flow model trains flow unless told otherwise); then
    only its own keys are filled, and only from a pretrained model of the same objective, so the
    other objective's keys stay unset and `validate` refuses any that the config sets."""
    taken = {}
    if cfg.objective is None:
        cfg.objective = (pretrained or {}).get("objective", "diffusion")
        taken["objective"] = "pretrained" if pretrained and "objective" in pretrained else "default"
    if pretrained is not None and pretrained.get("objective", "diffusion") != cfg.objective:
        pretrained = None
    for name in schedule_keys(cfg.objective):
        if getattr(cfg, name) is None:
            from_pretrained = pretrained is not None and name in pretrained
            value = pretrained[name] if from_pretrained else NoiseConfig.__dataclass_fields__[name].default
            setattr(cfg, name, value)
            taken[name] = "pretrained" if from_pretrained else "default"
    return taken


def scheduler_config(cfg: NoiseConfig) -> dict:
    """The DDPMScheduler config of this schedule (flow: FlowMatchEulerDiscreteScheduler's, marked
    prediction_type=flow_prediction); saved with the pipeline, and every sampler is built from it."""
    if cfg.objective == "flow":
        return dict(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift, prediction_type=FLOW_PREDICTION)
    return dict(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type, clip_sample=False,
        timestep_spacing=cfg.timestep_spacing, rescale_betas_zero_snr=cfg.zero_terminal_snr,
        # SD's value: leading spacing ends at t=1, not 0. The other spacings ignore it, and diffusers'
        # SD pipelines rewrite any other value on load, with a warning.
        steps_offset=1,
    )


def make_train_scheduler(cfg: NoiseConfig) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The forward process as a diffusers scheduler (flow: the sampler of that name, which holds the schedule)."""
    config = scheduler_config(cfg)
    if cfg.objective != "flow":
        return DDPMScheduler.from_config(config)
    marker = config.pop("prediction_type")  # not an argument of the FlowMatch class: registered, not passed (and logged)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.register_to_config(prediction_type=marker)
    return scheduler


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
    if cfg.objective == "flow":
        return flow_inputs(cfg, latents, generator)
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


# ----------------------------------------------------------------------------- rectified flow (SD3)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Esser et al. 2024, eq. 23: t' = s t / (1 + (s - 1) t). With s = sqrt(m / n), an image of m
    pixels at t' is as uncertain about x0 as one of n pixels at t (sec. 5.3.2): more pixels need more
    noise. FlowMatchEulerDiscreteScheduler's `shift` applies the same map to its sigmas."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times(cfg: NoiseConfig, generator: Generators, like: torch.Tensor) -> torch.Tensor:
    """t in (0, 1) per item: logit-normal (Esser et al. 2024, eq. 19: t = sigmoid(u), u ~ N(m, s^2),
    which weights the middle of the path, their best rf/lognorm(0, 1)) or uniform, then shifted;
    drawn by diffusers' compute_density_for_timestep_sampling, item i from generator i."""
    scheme = "logit_normal" if cfg.timestep_sampling == "logit_normal" else "none"  # "none": uniform
    gens = generator if isinstance(generator, list) else [generator]
    count = 1 if isinstance(generator, list) else like.shape[0]
    u = torch.cat([compute_density_for_timestep_sampling(
        scheme, count, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
        device=g.device if g is not None else like.device, generator=g).cpu() for g in gens])
    return shift_times(u, cfg.shift).to(like.device)


def flow_inputs(cfg: NoiseConfig, latents: torch.Tensor, generator: Generators = None):
    """(x_t, timesteps, target, None) of rectified flow (Esser et al. 2024, eq. 1 with a_t = 1 - t,
    b_t = t, sec. 3.1): x_t = (1 - t) x0 + t eps, and the target is the velocity
    dx_t/dt = eps - x0. The U-Net sees t * num_train_timesteps, as diffusers' SD3 training does,
    continuous rather than on a grid, since flow samplers visit any sigma * num_train_timesteps.
    Loss weights: none; with logit-normal t that is SD3's rf/lognorm objective."""
    noise = sample_noise(latents, cfg.noise_offset, generator)
    t = flow_times(cfg, generator, latents)
    t_ = t.to(latents.dtype).view(-1, *[1] * (latents.ndim - 1))
    noisy = (1 - t_) * latents + t_ * noise
    return noisy, t * cfg.num_train_timesteps, noise - latents, None
