"""Sampling: schedulers by short name, and the guided denoising loop written out once.

Every scheduler is built from the model's training schedule (`make_scheduler`): the prediction
type, betas, timestep spacing and zero-terminal-SNR rescaling a model was trained with carry over
to whichever sampler a user picks, and a sampler that cannot honour the schedule is refused.
Samplers belong to one objective: the diffusion ones (DDPM process, epsilon or v) and the flow ones
(`flow-*`: rectified flow, the model predicts the velocity eps - x0; Esser et al. 2024); asking
for one on a model of the other objective is refused by name.

`denoise()` is the loop of diffusers' StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline in one place, with the same random draws in the same order, the
same guidance and the same scheduler calls, so for the same seeds it gives the same latents:

    text-to-image   start from noise * init_noise_sigma (flow: the noise itself, x_1 = eps)
    img2img         skip the first (1 - strength) of the steps; start from the image noised to
                    the first kept timestep (SDEdit, Meng et al. 2022)
    inpainting      4-channel UNets: after each step, outside the mask, put back the image noised
                    to the next timestep ("blended" sampling, Avrahami et al. 2022);
                    9-channel inpainting UNets: the mask and the masked image's latents are
                    concatenated to the UNet input (Rombach et al. 2022, the SD inpainting model)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSDEScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, FlowMatchLCMScheduler,
                       HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler,
                       LMSDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from ldm.diffusion import FLOW_PREDICTION, objective_of
from ldm.models.vae import latent_scale

# name -> (scheduler class, the sampler settings the name fixes, one-line description)
DIFFUSION_SCHEDULERS: dict[str, tuple[type, dict, str]] = {
    "ddpm": (DDPMScheduler, {}, "ancestral DDPM (Ho et al. 2020)"),
    "ddim": (DDIMScheduler, {}, "DDIM, deterministic at eta=0 (Song et al. 2021)"),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}, "PLMS, pseudo linear multistep (Liu et al. 2022)"),
    "lms": (LMSDiscreteScheduler, {}, "linear multistep (k-diffusion, Karras et al. 2022)"),
    "euler": (EulerDiscreteScheduler, {}, "Euler (Karras et al. 2022, alg. 2 without churn)"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler ancestral (k-diffusion)"),
    "heun": (HeunDiscreteScheduler, {}, "Heun 2nd order (Karras et al. 2022, alg. 1)"),
    "kdpm2": (KDPM2DiscreteScheduler, {}, "DPM-Solver-2 (k-diffusion)"),
    "kdpm2_a": (KDPM2AncestralDiscreteScheduler, {}, "DPM-Solver-2 ancestral (k-diffusion)"),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2},
                "DPM-Solver++(2M) (Lu et al. 2022)"),
    "dpm++2m_karras": (DPMSolverMultistepScheduler,
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                       "DPM-Solver++(2M) on Karras et al. 2022 sigmas"),
    "dpm++2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                    "DPM-Solver++(2M) SDE"),
    "dpm++sde": (DPMSolverSDEScheduler, {}, "DPM-Solver++ SDE, Brownian-tree noise (k-diffusion; needs torchsde)"),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC (Zhao et al. 2023)"),
    "deis": (DEISMultistepScheduler, {}, "DEIS multistep (Zhang & Chen 2023)"),
    # for consistency-distilled models (distill.py): its original_inference_steps and timestep_scaling come
    # from the model's schedule (ldm.json), the values it was distilled with
    "lcm": (LCMScheduler, {}, "multistep latent consistency sampling (Luo et al. 2023): x0, then re-noised"),
}
# For models trained with noise.objective=flow: diffusers' FlowMatch* schedulers, and its multistep
# solvers on flow sigmas (use_flow_sigmas, prediction_type=flow_prediction). Only the latter have
# init_noise_sigma and scale_model_input, which diffusers' StableDiffusionPipeline calls.
FLOW_SCHEDULERS: dict[str, tuple[type, dict, str]] = {
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}, "Euler on the flow ODE dx/dt = v (Esser et al. 2024; SD3's)"),
    "flow-heun": (FlowMatchHeunDiscreteScheduler, {}, "Heun 2nd order on the flow ODE (Karras et al. 2022, alg. 1)"),
    "flow-lcm": (FlowMatchLCMScheduler, {}, "multistep consistency sampling (Luo et al. 2023): x0, then re-noised"),
    "flow-dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_flow_sigmas": True},
                     "DPM-Solver++(2M) on flow sigmas (Lu et al. 2022)"),
    "flow-unipc": (UniPCMultistepScheduler, {"use_flow_sigmas": True}, "UniPC on flow sigmas (Zhao et al. 2023)"),
    "flow-ddim": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 1, "use_flow_sigmas": True},
                  "DDIM on flow sigmas (DPM-Solver++ of order 1): what diffusers runs of a flow consistency student"),
}
SCHEDULERS: dict[str, tuple[type, dict, str]] = {**DIFFUSION_SCHEDULERS, **FLOW_SCHEDULERS}
# What a model is sampled with when nobody names a sampler: one that diffusers' StableDiffusionPipeline
# also runs, so an export's saved scheduler works there as it is.
DEFAULT_SAMPLERS = {"diffusion": "dpm++2m", "flow": "flow-dpm++2m"}

# Keys some name above fixes: a sampler choice, not the model's schedule, so they never carry over
# from the saved scheduler (a pipeline saved with Karras sigmas must not make "euler" use them).
# Samplers that classifier guidance (`ClassifierGuidance`) refuses, and why. It corrects the model's
# epsilon at (x_t, t) by the classifier's gradient there, which every other sampler takes as it is.
NOT_CLASSIFIER_GUIDABLE = {
    **{name: "a flow sampler: the classifiers here are trained on the diffusion process (noise.objective=diffusion)"
       for name in FLOW_SCHEDULERS},
    "kdpm2": "its second stage calls the model at interpolated, non-integer timesteps the classifier never saw",
    "kdpm2_a": "its second stage calls the model at interpolated, non-integer timesteps the classifier never saw",
    "dpm++sde": "its midpoint stage calls the model at interpolated timesteps the classifier never saw",
    "lcm": "a consistency model's output is its jump to x0, not a score that a classifier's gradient can be added to",
}

SAMPLER_KEYS = frozenset(key for _, settings, _ in SCHEDULERS.values() for key in settings)

# important: latents are not images in [-1, 1]. DDIM/DDPM default to clipping x0 there, which
# ruins latent samples; SD's configs say clip_sample=False, and a saved config of a scheduler
# that has no such key (Euler, DPM-Solver) must not bring the clipping back.
LATENT_DEFAULTS = {"clip_sample": False}


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__init__).parameters)


def sampler_objective(name: str) -> str:
    """The training objective the sampler `name` fits: "flow" or "diffusion"."""
    return "flow" if name in FLOW_SCHEDULERS else "diffusion"


def samplers_for(objective: str) -> list[str]:
    return [n for n in SCHEDULERS if sampler_objective(n) == objective]


def _flow_schedule(schedule: dict) -> dict:
    """A flow schedule in every flow scheduler's words: `shift` (FlowMatch*) is `flow_shift` to the
    multistep solvers, whose target is prediction_type=flow_prediction."""
    if schedule.get("use_dynamic_shifting"):
        raise ValueError("this model's scheduler shifts its timesteps by image size (use_dynamic_shifting, as Flux "
                         "does); the samplers here take a fixed shift")
    shift = schedule.get("shift", schedule.get("flow_shift", 1.0))
    # steps_offset: flow sigmas ignore it, and StableDiffusionPipeline rewrites any value but 1, with a warning
    return {**schedule, "shift": shift, "flow_shift": shift, "prediction_type": FLOW_PREDICTION, "steps_offset": 1}


def make_scheduler(name: str, schedule: dict):
    """The scheduler `name`, configured with the model's training `schedule` (a scheduler config).

    Keys the class does not take are dropped, except zero-terminal-SNR rescaling: a scheduler that
    cannot apply it would sample another noise schedule than the model learned, so it is refused.
    A sampler of the other objective (a diffusion sampler on a flow model, or a flow one on an
    epsilon/v model) would integrate the wrong process, so it is refused too.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    objective = objective_of(schedule)
    if sampler_objective(name) != objective:
        raise ValueError(f"scheduler {name!r} samples {sampler_objective(name)} models, but this model was trained "
                         f"with noise.objective={objective}; use one of: {', '.join(samplers_for(objective))}")
    if objective == "flow":
        schedule = _flow_schedule(schedule)
    cls, settings, _ = SCHEDULERS[name]
    if name == "dpm++sde":
        try:
            import torchsde  # noqa: F401
        except ImportError as err:
            raise ImportError("scheduler 'dpm++sde' needs torchsde: pip install torchsde") from err
    params = _init_params(cls)
    if schedule.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in params:
        able = [n for n, (c, _, _) in DIFFUSION_SCHEDULERS.items() if "rescale_betas_zero_snr" in _init_params(c)]
        raise ValueError(f"scheduler {name!r} cannot sample this model's zero-terminal-SNR schedule "
                         f"(rescale_betas_zero_snr); use one of: {', '.join(able)}")
    config = {**LATENT_DEFAULTS, **{k: v for k, v in schedule.items() if k not in SAMPLER_KEYS}, **settings}
    return cls.from_config({k: v for k, v in config.items() if k in params})


def scheduler_name_of(scheduler) -> str | None:
    """The name in SCHEDULERS that builds this scheduler's sampler (class and settings), or None."""
    for name, (cls, settings, _) in SCHEDULERS.items():
        if type(scheduler) is not cls:
            continue
        params = _init_params(cls)
        fixed = {k: settings.get(k, params[k].default) for k in SAMPLER_KEYS if k in params}
        if all(scheduler.config.get(k) == v for k, v in fixed.items()):
            return name
    return None


def seed_sde_noise(scheduler, seeds: list[int]) -> None:
    """Seed the Brownian-tree noise of DPMSolverSDEScheduler, one tree per image.

    It draws its noise from torchsde, not from the generator passed to `step`, and without a seed
    from torch's global RNG; seeding it with the images' seeds makes the same seed give the same
    image, whatever else is in the batch. Other schedulers are left as they are.
    """
    if isinstance(scheduler, DPMSolverSDEScheduler):
        scheduler.noise_sampler_seed = [int(s) for s in seeds]


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same draws on every device, as diffusers recommends."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """Gaussian noise, image i drawn from generators[i] (diffusers' randn_tensor)."""
    return randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (undoing the stored scale and shift)."""
    scale, shift = latent_scale(vae)
    z = latents / scale + shift
    images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents: a posterior sample, drawn as diffusers' img2img draws it.

    With a list of generators, sample i comes from generators[i]; one image with several
    generators is encoded once and sampled once per generator.
    """
    scale, shift = latent_scale(vae)
    x = (images * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(x).latent_dist
    if isinstance(generator, list) and len(generator) != x.shape[0]:
        if x.shape[0] != 1:
            raise ValueError(f"{len(generator)} generators for {x.shape[0]} images")
        posterior = DiagonalGaussianDistribution(posterior.parameters.expand(len(generator), -1, -1, -1))
    z = posterior.sample(generator=generator)
    return (z - shift) * scale


@dataclasses.dataclass
class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, sec. 4, Algorithm 2 / eq. 14): each model
    evaluation's epsilon becomes eps - scale * sqrt(1 - abar_t) * grad_x log p(y | x_t, t), the score
    of the class-conditional distribution; with classifier-free guidance on, the CFG-combined one.

    `classifier(x_t, t)` gives logits (B, K) of the scaled model input x_t = sqrt(abar) x0 +
    sqrt(1 - abar) eps at timesteps t (B,), as ldm.train.classifier's NoisyClassifier; `labels` (B,)
    the wanted classes. scale=0 leaves sampling bit-identical to unguided sampling.
    """

    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    labels: torch.Tensor
    scale: float = 1.0
    schedule: dict | None = None  # the noise schedule the classifier was trained on (checked against the model's)


def classifier_guidance_problem(scheduler, schedule: dict | None = None) -> str | None:
    """Why classifier guidance cannot run with `scheduler` (or a classifier trained on `schedule`), or None."""
    name = scheduler_name_of(scheduler)
    if name in NOT_CLASSIFIER_GUIDABLE or is_flow(scheduler):
        able = [n for n in DIFFUSION_SCHEDULERS if n not in NOT_CLASSIFIER_GUIDABLE]
        return (f"classifier guidance cannot run with scheduler {name!r}: {NOT_CLASSIFIER_GUIDABLE.get(name, 'a flow sampler')}; "
                f"use one of: {', '.join(able)}")
    if schedule:
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "rescale_betas_zero_snr")
        diffs = [f"{k}: classifier {schedule.get(k)!r}, model {scheduler.config.get(k)!r}" for k in keys
                 if k in schedule and schedule.get(k) != scheduler.config.get(k)]
        if diffs:
            return "the classifier was trained on another noise schedule than the model's: " + "; ".join(diffs)
    return None


def classifier_guided(guidance: ClassifierGuidance, scheduler, x_t: torch.Tensor, pred: torch.Tensor, t) -> torch.Tensor:
    """The model prediction `pred` at the scaled input `x_t`, timestep t, with classifier guidance
    (ClassifierGuidance). epsilon: eps - s sqrt(1 - abar) g; v = sqrt(abar) eps - sqrt(1 - abar) x0 at
    fixed x_t moves by -s sqrt(1 - abar) g / sqrt(abar); x0 ("sample") by + s (1 - abar) g / sqrt(abar)."""
    abar = scheduler.alphas_cumprod.to(x_t.device)[int(round(float(t)))].float()
    if abar <= 0:  # zero terminal SNR: x_t is pure noise, about which a classifier knows nothing
        return pred
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        times = torch.full((x.shape[0],), float(t), device=x.device)
        log_p = torch.log_softmax(guidance.classifier(x, times).float(), dim=-1)
        chosen = log_p.gather(1, guidance.labels.to(x.device).view(-1, 1)).sum()
        grad = torch.autograd.grad(chosen, x)[0]
    d = guidance.scale * (1 - abar).sqrt() * grad  # the change of eps, with the sign of the score
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        shift = -d
    elif kind == "v_prediction":
        shift = -d / abar.sqrt()
    else:  # "sample": x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        shift = (1 - abar).sqrt() * d / abar.sqrt()
    return (pred.float() + shift).to(pred.dtype)


@dataclasses.dataclass
class Inpainting:
    """What inpainting adds to the loop (diffusers' StableDiffusionInpaintPipeline)."""

    mask: torch.Tensor                                  # (B, 1, h, w) at latent size; 1 = regenerate
    masked_image_latents: torch.Tensor | None = None    # for 9-channel inpainting UNets, else None


def kept_timesteps(scheduler, num_steps: int, strength: float, device) -> torch.Tensor:
    """The timesteps to run: all of them, or for img2img the last `strength` of them (as
    diffusers' get_timesteps: multistep schedulers keep `order` entries per step)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    set_steps(scheduler, num_steps, device)
    kept = min(int(num_steps * strength), num_steps)
    if kept < 1:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run; raise either")
    start = (num_steps - kept) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def set_steps(scheduler, num_steps: int, device) -> None:
    """`scheduler.set_timesteps(num_steps)`, except FlowMatchLCMScheduler: its own grid runs from sigma 1 to
    1 / num_train_timesteps inclusive, so the last of n steps starts where the sample is already clean and
    re-predicts it (2 steps are 1). Here it takes the n sigmas 1, (n - 1) / n, ..., 1 / n (before its shift),
    each step a jump to x0 and back to the next."""
    if isinstance(scheduler, FlowMatchLCMScheduler):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], device=device)
    else:
        scheduler.set_timesteps(num_steps, device=device)


def is_flow(scheduler) -> bool:
    """Whether `scheduler` samples a flow-matching model (a FlowMatch* class or flow sigmas)."""
    return objective_of({"_class_name": type(scheduler).__name__, **scheduler.config}) == "flow"


def _sigma(scheduler, t, like: torch.Tensor) -> torch.Tensor:
    """A flow scheduler's sigma (= t in [0, 1]) of timestep(s) t: every flow scheduler's timesteps
    are sigma * num_train_timesteps (DPM-Solver's and UniPC's rounded down to integers), as the
    U-Net was trained (ldm.diffusion.flow_inputs)."""
    t = torch.as_tensor(t, device=like.device).float().reshape(-1)
    return (t / scheduler.config.num_train_timesteps).to(like.dtype).view(-1, *[1] * (like.ndim - 1))


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x0 noised to `timesteps`: the scheduler's add_noise, or for the FlowMatch* schedulers, which
    have none, x_t = (1 - sigma) x0 + sigma eps (Esser et al. 2024, eq. 1; their scale_noise,
    without its dependence on the scheduler's step index)."""
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(x0, noise, timesteps)
    sigma = _sigma(scheduler, timesteps, x0)
    return (1 - sigma) * x0 + sigma * noise


def _scale_model_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    """The FlowMatch* schedulers feed x_t to the model as it is and have no scale_model_input."""
    return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x


def predicted_x0(scheduler, model_input: torch.Tensor, prediction: torch.Tensor, t) -> torch.Tensor:
    """x0 from the scaled model input (x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for every
    scheduler, after scale_model_input) and the prediction, for any scheduler.
    Flow: x_t = (1 - sigma) x0 + sigma eps and v = eps - x0, so x0 = x_t - sigma v."""
    if is_flow(scheduler):
        return model_input - _sigma(scheduler, t, model_input) * prediction
    abar = scheduler.alphas_cumprod.to(model_input.device)[int(round(float(t)))].to(model_input.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (model_input - (1 - abar).sqrt() * prediction) / abar.sqrt()
    if kind == "v_prediction":  # Salimans & Ho 2022, eq. 9
        return abar.sqrt() * model_input - (1 - abar).sqrt() * prediction
    return prediction


def noise_level(scheduler, t):
    """The noise level of timestep t as EDM's sigma (Karras et al. 2022): x_t / alpha_t = x0 + sigma eps, so
    sigma = sqrt((1 - abar) / abar) on the DDPM process and sigma_t / (1 - sigma_t) on a flow (inf at pure noise:
    a flow's t = 1, a zero-terminal-SNR schedule's last timestep).
    One scale for every objective and sampler, the one guidance intervals are given in. A float for one
    timestep, a float64 tensor for a tensor of them."""
    times = torch.as_tensor(t, dtype=torch.float64).cpu()
    if is_flow(scheduler):
        s = times / scheduler.config.num_train_timesteps
        level = s / (1 - s)
    else:
        abar = scheduler.alphas_cumprod.double().cpu()[times.round().long()]
        level = ((1 - abar) / abar).sqrt()
    return level.item() if level.ndim == 0 else level


def in_interval(scheduler, t, interval: tuple[float, float] | None) -> bool:
    """Whether the step at timestep t is guided: lo < noise_level(t) <= hi; no interval: every step."""
    return interval is None or interval[0] < noise_level(scheduler, t) <= interval[1]


def check_guidance_interval(interval, name: str = "guidance_interval") -> tuple[float, float] | None:
    """A (lo, hi) pair of EDM noise levels with 0 <= lo < hi (hi may be inf), or None; anything else is an error
    naming `name`."""
    if interval is None:
        return None
    if isinstance(interval, (str, bytes)) or len(interval) != 2:
        raise ValueError(f"{name}: need two noise levels (lo, hi), got {interval!r}")
    lo, hi = (float(v) for v in interval)
    if not 0 <= lo < hi:
        raise ValueError(f"{name}: need 0 <= lo < hi (EDM noise levels), got ({lo}, {hi})")
    return lo, hi


class DiffusersGuidanceInterval:
    """Guidance in an interval for diffusers' StableDiffusionPipeline, which has no such argument: a
    `callback_on_step_end` that sets each next step's scale, `scale` inside (lo, hi] and 1 (the conditional pass
    alone) outside, with the prompt embeddings to match, so that the pipeline samples what `denoise` samples with
    `guidance_interval` (against the empty prompt, as `generate`'s default). The call's arguments set the first step:

        guide = DiffusersGuidanceInterval(pipe, 6.0, (0.28, 5.42))
        images = pipe(prompts, num_inference_steps=20, **guide.arguments(20)).images
    """

    def __init__(self, pipe, scale: float, interval: tuple[float, float]):
        self.pipe, self.scale, self.interval = pipe, float(scale), check_guidance_interval(interval)
        self.uncond = None

    def arguments(self, num_steps: int) -> dict:
        """The pipeline call's keyword arguments: the first step's scale and this callback."""
        scheduler = self.pipe.scheduler.__class__.from_config(self.pipe.scheduler.config)
        set_steps(scheduler, num_steps, "cpu")
        first = in_interval(scheduler, scheduler.timesteps[0], self.interval)
        return {"guidance_scale": self.scale if first else 1.0, "callback_on_step_end": self,
                "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}

    def __call__(self, pipe, i: int, t, tensors: dict) -> dict:
        embeds, timesteps = tensors["prompt_embeds"], pipe.scheduler.timesteps
        cond = embeds.chunk(2)[1] if pipe.do_classifier_free_guidance else embeds
        if i + 1 >= len(timesteps):
            return {}
        if not in_interval(pipe.scheduler, timesteps[i + 1], self.interval):
            pipe._guidance_scale = 1.0  # diffusers' own recipe for changing guidance mid-run (dynamic CFG)
            return {"prompt_embeds": cond}
        if self.uncond is None:  # the empty prompt, as the pipeline encodes it for guidance
            self.uncond = pipe.encode_prompt("", cond.device, 1, False)[0]
        pipe._guidance_scale = self.scale
        return {"prompt_embeds": torch.cat([self.uncond.expand(len(cond), -1, -1).to(cond.dtype), cond])}


def guidance_embedding_dim(unet) -> int | None:
    """The width of a U-Net's guidance-scale embedding (diffusers' time_cond_proj_dim), None when it has none."""
    return getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)


def guidance_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) embedding of per-image classifier-free guidance scales, for a U-Net distilled with its
    teacher's guidance folded in (LCM, Luo et al. 2023, sec. 4.2; the sinusoidal embedding of VDM).

    `guidance_scale` is the usual scale g of uncond + g (cond - uncond) (1: no guidance). The embedding
    is of g - 1, which is the LCM paper's w (its eq. 9 writes cond + w (cond - uncond)) and exactly what
    diffusers' StableDiffusionPipeline and LatentConsistencyModelPipeline pass as `timestep_cond` for
    `guidance_scale=g`. important: distillation (ldm.train.distill) embeds through this same function, so a
    model distilled at g samples at g here and in diffusers alike.
    """
    # the pipeline method uses nothing of `self`: called unbound, it is diffusers' own arithmetic
    # (g - 1 in double, then float32: the value diffusers' torch.tensor(guidance_scale - 1) holds)
    w = (torch.as_tensor(guidance_scale, dtype=torch.float64).reshape(-1) - 1).float()
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    """eta and generator for the schedulers whose `step` takes them (diffusers' prepare_extra_step_kwargs)."""
    params = set(inspect.signature(scheduler.step).parameters)
    return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}


def _start(scheduler, noise: torch.Tensor, num_steps: int, strength: float, image_latents: torch.Tensor | None,
           from_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps to run, x at the first of them).

    StableDiffusionPipeline lets the scheduler find its first step index; the image pipelines pin
    it (kept_timesteps). They differ where a timestep repeats, and each is followed here.
    """
    if from_image:
        timesteps = kept_timesteps(scheduler, num_steps, strength, noise.device)
    else:
        set_steps(scheduler, num_steps, noise.device)
        timesteps = scheduler.timesteps
    if strength < 1.0:
        return timesteps, add_noise(scheduler, image_latents, noise, timesteps[:1].repeat(noise.shape[0]))
    return timesteps, noise * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch*: none; x_1 = eps


@torch.no_grad()
def denoise(
    unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor, *,
    num_steps: int, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
    generator: list[torch.Generator] | None = None, eta: float = 0.0,
    image_latents: torch.Tensor | None = None, strength: float = 1.0, inpaint: Inpainting | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    class_labels: torch.Tensor | None = None, uncond_class_labels: torch.Tensor | None = None,
    classifier_guidance: ClassifierGuidance | None = None,
    guidance_interval: tuple[float, float] | None = None,
    part_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reverse process: classifier-free guided steps from noise (or a noised image) to x_0.

    `noise` is the initial Gaussian noise (not yet scaled by init_noise_sigma); `image_latents`
    the encoded image (scaled) for img2img (`strength` < 1) and 4-channel inpainting; `uncond`
    the negative-prompt embeddings (guidance is on when given and guidance_scale > 1). A U-Net with a
    guidance-scale embedding (consistency-distilled, ldm.train.distill) gets `guidance_scale` through it,
    as diffusers' StableDiffusionPipeline gives it, and `uncond` is not used.
    `callback(i, t, x after the step, predicted x0 at t)` sees every step.
    A class-conditional U-Net (ldm.data.labels) takes `class_labels` (B,), and with guidance on
    `uncond_class_labels` (its null class) in the unconditional branch; `classifier_guidance`
    (ClassifierGuidance) adds a classifier's gradient to every model evaluation.
    `guidance_interval` (lo, hi) applies classifier-free guidance only at the steps whose noise level (EDM sigma,
    `noise_level`) lies in (lo, hi], and the conditional prediction alone, one U-Net pass, elsewhere (Kynkaanniemi
    et al. 2024, "Applying guidance in a limited interval": guidance at high noise narrows what is drawn).
    `part_weights` (K, B) composes K prompts per image (Liu et al. 2022, "Compositional visual generation with
    composable diffusion models"): `cond` is then (K * B, ...), part k of every image in the k-th block, and the
    conditional prediction is u + sum_k w_k (e_k - u), the score of the product of the parts' distributions, which
    guidance then scales; it needs `uncond`, and outside `guidance_interval` it is taken at scale 1.
    """
    guidance_interval = check_guidance_interval(guidance_interval)
    blend = inpaint is not None and inpaint.masked_image_latents is None
    if image_latents is None and (strength < 1.0 or blend):
        raise ValueError("pass image_latents: img2img (strength < 1) starts from the image, and inpainting "
                         "with a 4-channel UNet blends it back in")
    from_image = image_latents is not None or inpaint is not None
    timesteps, x = _start(scheduler, noise, num_steps, strength, image_latents, from_image)
    # a consistency-distilled U-Net takes the guidance scale as an input (LCM): one pass per step, no CFG batch
    embedding_dim = guidance_embedding_dim(unet)
    composed = part_weights is not None
    parts = part_weights.shape[0] if composed else 1
    if composed and (uncond is None or embedding_dim is not None):
        raise ValueError("composed prompts need the unconditional prediction: pass uncond, and a U-Net that is not "
                         "consistency-distilled")
    guided = uncond is not None and (guidance_scale > 1.0 or composed) and embedding_dim is None
    unet_kwargs = {}
    if embedding_dim is not None:
        scales = torch.full((x.shape[0],), float(guidance_scale), dtype=torch.float64)
        unet_kwargs["timestep_cond"] = guidance_embedding(scales, embedding_dim).to(x.device, x.dtype)
    embeddings = torch.cat([uncond, cond]) if guided else cond
    inpaint_channels = []  # what a 9-channel UNet sees beside the latents: the mask and the masked image
    if inpaint is not None and not blend:
        inpaint_channels = [torch.cat([c] * (1 + parts)) if guided else c
                            for c in (inpaint.mask, inpaint.masked_image_latents)]
    extra = _step_kwargs(scheduler, generator, eta)
    labels = {}
    if class_labels is not None:
        if guided and uncond_class_labels is None:
            raise ValueError("pass uncond_class_labels (the null class) with class_labels and guidance on")
        labels = {"class_labels": torch.cat([uncond_class_labels] + [class_labels] * parts) if guided else class_labels}
    steered = classifier_guidance is not None and classifier_guidance.scale != 0  # scale 0: bit-identical
    if classifier_guidance is not None:
        problem = classifier_guidance_problem(scheduler, classifier_guidance.schedule)
        if embedding_dim is not None:
            problem = problem or ("classifier guidance: this U-Net is consistency-distilled (a guidance-scale embedding); "
                                  "its output is a jump to x0, not a score; guide the model it was distilled from")
        if problem:
            raise ValueError(problem)
    # the U-Net's other inputs with guidance on, and (outside the guidance interval) for the conditional half alone
    n = x.shape[0]
    inputs = {True: (embeddings, inpaint_channels, labels),
              False: (cond, [c[-n:] for c in inpaint_channels], {k: v[-n:] for k, v in labels.items()})}
    for i, t in enumerate(timesteps):
        inside = in_interval(scheduler, t, guidance_interval)
        guide = guided and (inside or composed)  # composed prompts are always the sum of their parts' predictions
        step_embeddings, channels, step_labels = inputs[guide]
        model_in = _scale_model_input(scheduler, torch.cat([x] * (1 + parts)) if guide else x, t)
        scaled = model_in[-n:]
        if channels:
            model_in = torch.cat([model_in, *channels], dim=1)
        pred = unet(model_in, t, encoder_hidden_states=step_embeddings, return_dict=False, **step_labels,
                    **unet_kwargs)[0]
        if guide:
            pred_uncond, *pred_parts = pred.chunk(1 + parts)
            pred_text = pred_parts[0]
            if composed:
                pred_text = pred_uncond + sum(w.view(-1, 1, 1, 1).to(pred) * (e - pred_uncond)
                                              for w, e in zip(part_weights, pred_parts))
            pred = pred_uncond + (guidance_scale if inside else 1.0) * (pred_text - pred_uncond)
            if guidance_rescale > 0:  # Lin et al. 2024, sec. 3.4
                pred = rescale_noise_cfg(pred, pred_text, guidance_rescale=guidance_rescale)
        else:
            # important: a U-Net compiled with CUDA graphs (ldm.fast, mode reduce-overhead) returns a
            # buffer that its next call overwrites, and schedulers keep past outputs (PNDM, multistep)
            pred = pred.clone()
        if steered:
            pred = classifier_guided(classifier_guidance, scheduler, scaled, pred, t)
        x0 = predicted_x0(scheduler, scaled, pred, t) if callback is not None else None
        x = scheduler.step(pred, t, x, **extra, return_dict=False)[0]
        if blend:
            # outside the mask: the image itself, noised to the level the next step starts from
            known = image_latents
            if i + 1 < len(timesteps):
                known = add_noise(scheduler, image_latents, noise, timesteps[i + 1 : i + 2])
            x = (1 - inpaint.mask) * known + inpaint.mask * x
        if callback is not None:
            callback(i, int(t), x, x0)
    return x
