"""Latent consistency distillation (LCM; Luo et al. 2023, "Latent Consistency Models") of a trained
pipeline into a sampler of 1 to 4 steps.

    python distill.py --config configs/distill/shapes_cpu.yaml

The teacher is any pipeline `ldm.infer.load_pipeline` reads (our run or pipeline directory, a
Stable Diffusion diffusers directory or single file) that predicts epsilon, v or x0, or a
rectified-flow model (`FlowSolver`: an Euler step, f(x, sigma) = x - sigma v, FlowMatchLCMScheduler);
the student starts as a copy of its U-Net and trains on the latent cache the teacher trained on.
Each sample of a batch (the paper's Algorithm 1, with its sec. 4.2 guidance and 4.3 skipping steps):

    t        one of the solver's grid t = k - 1, 2k - 1, ..., T - 1 (N = T / k steps), uniformly
    x_t      the cached latent noised to t, or (`consistency.on_policy`) what the student's own sampler feeds it
             at t (`sampler_inputs`);  w ~ U[w_min, w_max], a classifier-free guidance scale
    online   f(x_t, t, w, c)  = c_skip(t) x_t + c_out(t) x0_student(x_t, t, w, c)
    solver   x_s, s = t - k:  one DDIM step (eta 0) with the teacher's guided x0 and eps at scale w; or m steps of
             k / m (`consistency.solver_substeps`), each with Heun's correction (`consistency.solver_order` 2)
             or DPM-Solver++(2M)'s after the first (`consistency.multistep`)
    target   f-(x_s, s, w, c): the same function of the target network, an EMA of the student
    loss     pseudo-Huber(online - target), sqrt(d^2 + c^2) - c per element (Song & Dhariwal 2023)

Full weights (`lora.rank=0`): the student gets a guidance-scale embedding (diffusers'
`time_cond_proj_dim`), so one model samples every scale of [w_min, w_max]. LoRA (`lora.rank>0`,
LCM-LoRA, Luo et al. 2023b): rank-r adapters on the teacher's own U-Net, which has no such input,
so one scale is distilled (w_min = w_max) and the adapters load onto the teacher as they are.

Output (`<out_dir>/`): `pipeline/` (StableDiffusionPipeline with the student's U-Net and an
LCMScheduler carrying the solver's grid and time scaling, and `ldm.json` with the "consistency"
record and the recommended sampling), `lora/` for a LoRA run (the LCM-LoRA: diffusers' and kohya's
files), `samples/step-N.png` (one row per validation step count), `metrics.jsonl`, `config.yaml`,
`checkpoints/step-N/` for resume.

Where this departs from diffusers' `examples/consistency_distillation/train_lcm_distill_*_sd_wds.py`:
- c_skip and c_out come from the LCMScheduler that is exported (`boundary_scalings`), so sampling
  applies the function that was trained; the scripts take `--timestep_scaling_factor` and save no
  scheduler, and diffusers' LCMScheduler default (10) applies whatever was trained.
- the guidance scale is embedded by `ldm.sampling.guidance_embedding`, the g - 1 that diffusers'
  pipelines pass as `timestep_cond` for `guidance_scale=g`, and CFG uses the same g.
- the student's new embedding layer starts at zero, so the student starts as the teacher exactly
  (theirs: a random layer); the LoRA script draws w from a range its student cannot see (no
  embedding), which distils an average of scales: here a LoRA distils one.
- the grid's first step, t = k - 1, targets clean data (alpha_bar = 1 and f(x, s < 0) = x),
  where the scripts stop at alpha_bar_0.
- the unconditional input is the empty prompt encoded as the teacher was trained (its clip_skip,
  its tokenizer's length); teacher, student and target run in eval mode (no dropout in the target).
- part of a batch can train at the student's own sampler's inputs (`consistency.on_policy`), where its
  errors are; the scripts train at noised data only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
from pathlib import Path
from typing import Literal

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor

from ldm.config import ConfigError, require, to_dict
from ldm.data.cache import CacheMismatchError, LatentCache, open_cache, text_identity, vae_identity
from ldm.data.captions import CaptionConfig, process_caption
from ldm.data.images import image_grid
from ldm.diffusion import objective_of, shift_times
from ldm.infer import Pipeline, _ldm_record, load_pipeline, resolve_pipeline_dir
from ldm.models.lora import LoRAConfig, add_lora, merge_lora, save_lora
from ldm.models.paths import model_path_problem
from ldm.models.text import encode_prompts
from ldm.sampling import (check_guidance_interval, decode_latents, denoise, guidance_embedding, initial_noise,
                          make_scheduler, noise_level, seeded_generators)
from ldm.pipeline import save_pipeline
from ldm.train.common import (LoopConfig, lr_lambda, make_accelerator, make_optimizer, register_schedule, resume,
                              sample_generators, start_run, uniform)
from ldm.train.ema import make_ema, swapped_ema
from ldm.train.encode import DTYPES
from ldm.train.ldm import finetune_source, most_common_size, random_flips, size_batches
from ldm.train.loop import run_loop

SOLVER_PREDICTIONS = ("epsilon", "v_prediction", "sample")  # what the solver turns into x0 and eps (LCMScheduler's)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what LCMScheduler builds


# ----------------------------------------------------------------------------- config


# consistency.teacher_dtype: stage 2's names of the dtypes autocast can lower to; "": no autocast of its own
AUTOCAST_DTYPES = {"": None, **{name: dtype for name, dtype in DTYPES.items() if dtype is not torch.float32}}


@dataclasses.dataclass
class GuidanceConfig:
    w_min: float = 2.0         # classifier-free guidance scales distilled, each sample's drawn U[w_min, w_max]; the
    w_max: float = 6.0         # usual scale g of uncond + g (cond - uncond) (1: none), as infer.py's --guidance-scale
    embedding_dim: int = 256   # width of the student's guidance-scale embedding (time_cond_proj_dim); 0: none, one
                               # scale distilled in (w_min = w_max; what a LoRA needs, to load onto the teacher)
    interval: list[float] | None = None  # [lo, hi]: the teacher guides only where the noise level (EDM sigma) of the
                               # solver's step is in (lo, hi], as the teacher samples with `--guidance-interval`; None: all

    def validate(self) -> None:
        try:
            check_guidance_interval(self.interval, "interval")
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from None  # validate() names the section
        require(0 <= self.w_min <= self.w_max, f"guidance: need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        require(self.embedding_dim >= 0, f"guidance.embedding_dim must be >= 0, got {self.embedding_dim}")
        require(bool(self.embedding_dim) or self.w_min == self.w_max,
                f"guidance.embedding_dim=0: a student without a guidance embedding cannot tell scales apart and would "
                f"learn an average of [{self.w_min}, {self.w_max}]; set guidance.w_max = guidance.w_min (one scale)")


@dataclasses.dataclass
class ConsistencyConfig:
    solver_steps: int = 50         # N: the DDIM solver's grid of N timesteps k = T / N apart (t = k-1, 2k-1, ..., T-1;
                                   # the exported LCMScheduler's original_inference_steps); a training step jumps k
    timestep_scaling: float = 10.0 # time scale of c_skip, c_out (LCMScheduler's timestep_scaling; at 10, c_skip is ~0
                                   # except at t = 0, so f is the predicted x0)
    target_decay: float = 0.95     # EMA rate of the target network; 0: the student itself, without gradient (iCT)
    huber_c: float = 0.001         # pseudo-Huber loss sqrt(d^2 + c^2) - c per latent element; 0: squared error
    solver_substeps: int = 1       # m: the teacher solves each skip from t to s in m steps of k / m (m guided passes)
    solver_order: int = 1          # 1: DDIM (flow: Euler) steps of the teacher, the paper's; 2: Heun's correction on
                                   # the same ODE, a second guided teacher pass a step (none into clean data)
    multistep: bool = False        # substeps after a skip's first take DPM-Solver++(2M)'s second-order step from the
                                   # teacher's x0 one substep before (no extra pass; first order into clean data)
    on_policy: float = 0.0         # the fraction of samples whose x_t is what the student's own sampler feeds it at t
                                   # (from pure noise, each grid point's x0 re-noised to the next), not noised data
    teacher_dtype: str = ""        # "bf16" / "fp16": the passes that take no gradient (the frozen teacher's solve, the
                                   # target's prediction) run under autocast to it, as diffusers' LCM script casts its
                                   # teacher to the mixed-precision dtype; "": as train.mixed_precision

    def validate(self) -> None:
        require(self.solver_steps >= 1, f"consistency.solver_steps must be >= 1, got {self.solver_steps}")
        require(self.timestep_scaling > 0, f"consistency.timestep_scaling must be > 0, got {self.timestep_scaling}")
        require(0 <= self.target_decay < 1, f"consistency.target_decay must be in [0, 1), got {self.target_decay}")
        require(self.huber_c >= 0, f"consistency.huber_c must be >= 0, got {self.huber_c}")
        require(0 <= self.on_policy <= 1, f"consistency.on_policy must be in [0, 1], got {self.on_policy}")
        require(self.solver_substeps >= 1, f"consistency.solver_substeps must be >= 1, got {self.solver_substeps}")
        require(self.solver_order in (1, 2), f"consistency.solver_order must be 1 (DDIM/Euler) or 2 (Heun), got {self.solver_order}")
        require(not (self.multistep and self.solver_order == 2),
                "consistency.multistep and consistency.solver_order=2 are two second-order solvers: take one")
        require(self.teacher_dtype in AUTOCAST_DTYPES,
                f"consistency.teacher_dtype must be one of {sorted(AUTOCAST_DTYPES)}, got {self.teacher_dtype!r}")


@dataclasses.dataclass
class DistillValidationConfig:
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a large red circle in the center, on a white background"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3])  # one image per prompt and seed
    steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])   # one grid row block per step count

    def validate(self) -> None:
        require(all(s >= 1 for s in self.steps), f"validation.steps must all be >= 1, got {self.steps}")


@dataclasses.dataclass
class DistillConfig:
    out_dir: str = "runs/distill"      # run directory; the student's pipeline lands in <out_dir>/pipeline
    resume: str = "latest"             # "latest" (re-running the same command resumes), "" or a checkpoint path
    teacher: str = "runs/ldm"          # the pipeline to distil: our run or pipeline dir, an SD diffusers dir or .safetensors
    cache: str = "runs/latents"        # the latent cache the teacher trained on (refused unless made by its VAE)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # rank > 0: an LCM-LoRA (adapters only)
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    consistency: ConsistencyConfig = dataclasses.field(default_factory=ConsistencyConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)  # train.ema_decay: the exported weights' EMA
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)  # as the teacher was trained
    validation: DistillValidationConfig = dataclasses.field(default_factory=DistillValidationConfig)
    latent_sample: Literal["sample", "mode"] = "sample"  # draw z ~ q(z|x) each time, or use its mean
    sample_steps: int = 4              # the export's recommended steps (ldm.json "sampling": infer.py's, app.py's default)
    sample_guidance: float | None = None  # its recommended scale; None: the middle of [w_min, w_max] (no embedding: 1,
                                          # since the scale is distilled in and more would add CFG on top)

    def validate(self) -> None:
        problem = model_path_problem(self.teacher)
        require(problem is None, f"teacher: {problem}")
        require(Path(self.cache).is_dir(), f"cache: no latent cache directory {self.cache!r} (the one the teacher trained on)")
        require(self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}")
        require(not (self.lora.rank and self.guidance.embedding_dim),
                "lora.rank > 0 with guidance.embedding_dim > 0: an LCM-LoRA loads onto the teacher's U-Net, which has no "
                "guidance-embedding input; set guidance.embedding_dim=0 and one scale (guidance.w_min = guidance.w_max), "
                "or lora.rank=0 to distil full weights with the embedding")
        if self.sample_guidance is not None and self.guidance.embedding_dim:
            require(self.guidance.w_min <= self.sample_guidance <= self.guidance.w_max,
                    f"sample_guidance={self.sample_guidance} is outside the distilled range "
                    f"[{self.guidance.w_min}, {self.guidance.w_max}]")
        schedule = finetune_source(resolve_pipeline_dir(self.teacher)).scheduler
        if schedule is not None:
            problem = teacher_schedule_problem(schedule, self.consistency.solver_steps)
            require(problem is None, f"teacher {self.teacher}: {problem}")

    @property
    def recommended_guidance(self) -> float:
        """The scale the export samples with by default."""
        if self.sample_guidance is not None:
            return self.sample_guidance
        return (self.guidance.w_min + self.guidance.w_max) / 2 if self.guidance.embedding_dim else 1.0


def teacher_schedule_problem(schedule: dict, solver_steps: int) -> str | None:
    """Why the solvers here cannot distil a teacher trained with `schedule` (a diffusers scheduler config,
    as ldm.json or scheduler/ records it), or None when they can."""
    if objective_of(schedule) == "flow":
        if schedule.get("use_dynamic_shifting"):
            return ("its flow schedule shifts timesteps by image size (use_dynamic_shifting, as Flux does); the Euler "
                    "solver takes a fixed shift")
        return None
    kind = schedule.get("prediction_type", "epsilon")
    if kind not in SOLVER_PREDICTIONS:
        return f"prediction_type={kind!r}: the solver takes {', '.join(SOLVER_PREDICTIONS)} (or a flow model's velocity)"
    beta = schedule.get("beta_schedule", "linear")
    if schedule.get("trained_betas") is None and beta not in BETA_SCHEDULES:
        return f"beta_schedule={beta!r}: LCMScheduler builds {', '.join(BETA_SCHEDULES)} (or explicit trained_betas)"
    if schedule.get("rescale_betas_zero_snr") and kind == "epsilon":
        return ("zero-terminal-SNR schedule (rescale_betas_zero_snr) with epsilon prediction: x0 = (x_T - eps) / 0 at "
                "t = T; such a teacher must predict v")
    total = int(schedule.get("num_train_timesteps", 1000))
    if solver_steps > total:
        return f"consistency.solver_steps={solver_steps} exceeds its {total} training timesteps"
    return None


# ----------------------------------------------------------------------------- the solver and the consistency function


class DDIMSolver:
    """The skipping-step solver of LCM (Luo et al. 2023, sec. 4.3): one deterministic DDIM step (Song et al.
    2021, eq. 12 with eta = 0) from t to s = t - k on the teacher's schedule, on the grid of LCMScheduler
    (t = k - 1, 2k - 1, ..., its `lcm_origin_timesteps`), or `substeps` steps along `path`. s < 0 is clean
    data: alpha_bar = 1.
    The consistency function and the sampler are the exported LCMScheduler's."""

    objective = "diffusion"
    sampler = "lcm"  # what the export samples with, in diffusers as in infer.py

    def __init__(self, scheduler: LCMScheduler, substeps: int = 1):
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.double()  # the exported scheduler's: one schedule everywhere
        steps = scheduler.config.original_inference_steps
        self.k = scheduler.config.num_train_timesteps // steps
        grid = torch.arange(1, steps + 1) * self.k - 1
        # each t's path to s = t - k in `substeps` steps (rows: grid points; the teacher's timesteps are integers)
        self.path = grid[:, None] - (torch.arange(substeps + 1) * self.k / substeps).round().long()
        self.grid, self.previous = self.path[:, 0], self.path[:, -1]  # the first s is -1: clean data

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t per item (1 where t < 0), shaped to broadcast over `like`."""
        t = t.to(self.alphas_cumprod.device).long()
        abar = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        return abar.to(like.device, like.dtype).view(-1, *[1] * (like.ndim - 1))

    def x0_and_eps(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) of x_t = sqrt(abar) x0 + sqrt(1 - abar) eps from the model's prediction."""
        abar = self.alpha_bar(t, x)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        if self.prediction_type == "epsilon":
            return (x - b * prediction) / a, prediction
        if self.prediction_type == "v_prediction":  # v = a eps - b x0 (Salimans & Ho 2022, eq. 9)
            return a * x - b * prediction, a * prediction + b * x
        return prediction, (x - a * prediction) / b  # "sample"

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t eps."""
        abar = self.alpha_bar(t, like)
        return abar.sqrt(), (1 - abar).sqrt()

    def denoised(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.x0_and_eps(prediction, x, t)[0]

    def step(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps: the DDIM update that keeps x0 and eps."""
        abar = self.alpha_bar(s, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """EDM's sigma of each grid timestep t, as the sampler measures it (`ldm.sampling.noise_level`)."""
        return noise_level(self.scheduler, t)

    def update(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The solver's step from t to s with the teacher's (guided) prediction."""
        return self.step(*self.x0_and_eps(prediction, x_t, t), s)

    def corrected(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, prediction: torch.Tensor,
                  x_s: torch.Tensor, prediction_s: torch.Tensor) -> torch.Tensor:
        """Heun's step from t to s: DDIM is Euler's method on x / sqrt(abar) against sqrt((1 - abar) / abar) with
        slope eps (Karras et al. 2022, sec. 3), so the correction averages the eps at t and at the Euler step's x_s.
        Into clean data (s < 0) the Euler step stays: there is no eps to take at sigma 0."""
        eps = (self.x0_and_eps(prediction, x_t, t)[1] + self.x0_and_eps(prediction_s, x_s, s.clamp(min=0))[1]) / 2
        abar = self.alpha_bar(t, x_t)
        heun = self.step((x_t - (1 - abar).sqrt() * eps) / abar.sqrt(), eps, s)
        return torch.where((s >= 0).to(x_t.device).view(-1, *[1] * (x_t.ndim - 1)), heun, x_s)

    def consistency(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x_t, t) = c_skip x_t + c_out x0 from a U-Net prediction: what LCMScheduler.step calls `denoised`."""
        c_skip, c_out = boundary_scalings(self.scheduler, t, x)
        return c_skip * x + c_out * self.x0_and_eps(prediction, x, t)[0]

    @staticmethod
    def model_timestep(s: torch.Tensor) -> torch.Tensor:
        return s.clamp(min=0)  # the U-Net's input at s < 0 (clean data), where f is x itself

    def sampling_scheduler(self) -> LCMScheduler:
        """A fresh scheduler of the sampler the export recommends (and saves: diffusers runs it)."""
        return LCMScheduler.from_config(self.scheduler.config)

    saved_scheduler = sampling_scheduler

    def record(self) -> dict:
        return {"solver": "ddim", "skip": self.k}


class FlowSolver:
    """The same for a flow-matching teacher (noise.objective=flow: x_t = (1 - sigma) x0 + sigma eps, velocity
    eps - x0; Esser et al. 2024). The grid is N sigmas, u = 1/N, 2/N, ..., 1 shifted as the teacher was trained
    (`ldm.diffusion.shift_times`), each with the grid point below it (0 below the first: clean data); the solver
    is one Euler step of the teacher's ODE dx/dsigma = v (or `substeps` of them along `path`); the consistency
    function is f(x, sigma) = x - sigma v, the x0 that FlowMatchLCMScheduler.step re-noises. It is x itself at
    sigma = 0, so the boundary condition holds without c_skip and c_out. Timesteps are sigma * num_train_timesteps, as the teacher saw them."""

    objective = "flow"
    sampler = "flow-lcm"

    def __init__(self, schedule: dict, steps: int, substeps: int = 1):
        self.schedule = schedule
        self.total = int(schedule.get("num_train_timesteps", 1000))
        self.shift = float(schedule.get("shift", schedule.get("flow_shift", 1.0)))
        fine = shift_times(torch.arange(steps * substeps + 1, dtype=torch.float64) / (steps * substeps), self.shift)
        # each grid point's path to the one below in `substeps` steps, evenly spaced before the shift
        index = substeps * torch.arange(1, steps + 1)[:, None] - torch.arange(substeps + 1)
        self.path = (fine * self.total).float()[index]
        self.grid, self.previous = self.path[:, 0], self.path[:, -1]
        self.reference = make_scheduler(self.sampler, schedule)  # read, never stepped: sampling_scheduler() steps

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.double() / self.total).to(like.device, like.dtype).view(-1, *[1] * (like.ndim - 1))

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma(t, like)
        return 1 - sigma, sigma

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """EDM's sigma of each grid timestep t, as the sampler measures it (`ldm.sampling.noise_level`)."""
        return noise_level(self.reference, t)

    def update(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x_t + (self.sigma(s, x_t) - self.sigma(t, x_t)) * prediction

    def corrected(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, prediction: torch.Tensor,
                  x_s: torch.Tensor, prediction_s: torch.Tensor) -> torch.Tensor:
        """Heun's step from t to s: the mean of the velocities at t and at the Euler step's x_s; into clean data
        (sigma 0) the Euler step stays, as EDM's sampler ends."""
        heun = self.update((prediction + prediction_s) / 2, x_t, t, s)
        return torch.where(self.sigma(s, x_t) > 0, heun, x_s)

    def consistency(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x - self.sigma(t, x) * prediction

    denoised = consistency  # the x0 of a velocity: the consistency function needs no c_skip here

    @staticmethod
    def model_timestep(s: torch.Tensor) -> torch.Tensor:
        return s

    def sampling_scheduler(self):
        """FlowMatchLCMScheduler, which infer.py, app.py and ldm.sampling step on sigmas 1, (n-1)/n, ..., 1/n
        (`ldm.sampling.set_steps`), shifted: the student's grid points when n divides N."""
        return make_scheduler(self.sampler, self.schedule)

    def saved_scheduler(self):
        """What the export saves for diffusers' StableDiffusionPipeline, which cannot run a FlowMatch* scheduler
        (it multiplies by init_noise_sigma): DDIM on flow sigmas (`flow-ddim`), which steps from each x0 of the
        consistency function along the noise it implies instead of fresh noise."""
        return make_scheduler("flow-ddim", self.schedule)

    def record(self) -> dict:
        return {"solver": "euler", "shift": self.shift}


Solver = DDIMSolver | FlowSolver


def multistep_update(solver: Solver, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x0: torch.Tensor,
                     r: torch.Tensor, x0_r: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M)'s step from t to s (Lu et al. 2022, alg. 2): the first-order (DDIM / Euler) step in
    log-SNR lambda with the teacher's x0 at t extrapolated by its change since the step before (x0_r at r),
    D = x0 + (x0 - x0_r) h / (2 h_r). Into clean data (sigma_s = 0) the first-order step, as the sampler ends.
    Computed in float64: lambda is infinite at sigma 0 and at alpha 0 (a flow's pure noise, where the correction
    vanishes)."""
    (a_t, s_t), (a_s, s_s), (a_r, s_r) = (solver.alpha_sigma(time, x_t.double()) for time in (t, s, r))
    lam = lambda a, sg: torch.log(a) - torch.log(sg)
    h, h_r = lam(a_s, s_s) - lam(a_t, s_t), lam(a_t, s_t) - lam(a_r, s_r)
    x0, x0_r = x0.double(), x0_r.double()
    second = x0 + (x0 - x0_r) * torch.nan_to_num(h / (2 * h_r), nan=0.0, posinf=0.0)
    stepped = (s_s / s_t) * x_t.double() + a_s * (-torch.expm1(-h)) * second
    return torch.where(s_s > 0, stepped, x0).to(x_t.dtype)


def make_solver(schedule: dict, cfg: ConsistencyConfig) -> Solver:
    """The solver for a teacher trained with `schedule`: DDIM on the DDPM process, Euler on a flow."""
    if objective_of(schedule) == "flow":
        return FlowSolver(schedule, cfg.solver_steps, cfg.solver_substeps)
    return DDIMSolver(lcm_scheduler(schedule, cfg), cfg.solver_substeps)


def boundary_scalings(scheduler: LCMScheduler, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of f(x, t) = c_skip x + c_out x0 (Song et al. 2023, eq. 8), from the exported
    LCMScheduler itself, so that its `step` applies the function trained; (1, 0) for t < 0 (clean data)."""
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.double())
    c_skip, c_out = torch.where(t < 0, 1.0, c_skip), torch.where(t < 0, 0.0, c_out)
    shape = (-1, *[1] * (like.ndim - 1))
    return c_skip.to(like.device, like.dtype).view(shape), c_out.to(like.device, like.dtype).view(shape)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """mean of sqrt((a - b)^2 + c^2) - c (Song & Dhariwal 2023, sec. 3.3; per element, as LCM's scripts);
    c = 0: the mean squared error."""
    d = (a.float() - b.float()) ** 2
    return (torch.sqrt(d + c * c) - c).mean() if c else d.mean()


def lcm_scheduler(schedule: dict, cfg: ConsistencyConfig) -> LCMScheduler:
    """The LCMScheduler of the teacher's schedule with the solver's grid and time scaling: the scheduler the
    export samples with, and where training takes alpha_bar, c_skip and c_out from."""
    return make_scheduler("lcm", student_schedule(schedule, cfg))


def student_schedule(schedule: dict, cfg: ConsistencyConfig) -> dict:
    """The teacher's schedule plus what LCM sampling needs to match the training (ldm.json's training_scheduler)."""
    return {**schedule, "original_inference_steps": cfg.solver_steps, "timestep_scaling": cfg.timestep_scaling}


# ----------------------------------------------------------------------------- models


def load_teacher(cfg: DistillConfig) -> Pipeline:
    """The teacher pipeline in float32 on the CPU (the trainer moves what runs), checked for what the solver needs."""
    teacher = load_pipeline(cfg.teacher, device="cpu", dtype=torch.float32)
    problem = teacher_schedule_problem(teacher.base_scheduler_config, cfg.consistency.solver_steps)
    if teacher.consistency or teacher.unet.config.time_cond_proj_dim is not None:
        problem = problem or ("it is consistency-distilled already (its U-Net has a guidance-scale embedding, "
                              "time_cond_proj_dim); distil the model it came from")
    if problem:
        raise ConfigError(f"teacher {cfg.teacher}: {problem}")
    for module in (teacher.unet, teacher.vae, teacher.text_encoder):
        module.requires_grad_(False)
    return teacher


def student_unet(teacher: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """A copy of the teacher's U-Net, with a guidance-scale embedding of `embedding_dim` added to the time
    embedding (0: none). important: the new projection starts at zero, so the student computes exactly
    what the teacher does until it trains; every other weight is the teacher's, checked by name."""
    if not embedding_dim:
        return copy.deepcopy(teacher)
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=embedding_dim)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = ["time_embedding.cond_proj.weight"]  # a Linear without bias, added to the sinusoidal time features
    if list(missing) != new or unexpected:
        raise RuntimeError(f"student U-Net: expected only {new} new, got missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher.device)


class TargetNetwork:
    """The target network of consistency training: the student's trained parameters averaged at a constant rate
    (diffusers' EMAModel with min_decay = decay; its first update copies the student), evaluated through
    torch.func.functional_call so the student's own weights are never swapped; at rate 0 the student itself."""

    def __init__(self, unet: torch.nn.Module, decay: float, device):
        self.names = [n for n, p in unet.named_parameters() if p.requires_grad]
        params = [p for p in unet.parameters() if p.requires_grad]
        self.ema = None
        if decay:
            self.ema = EMAModel(params, decay=decay, min_decay=decay, use_ema_warmup=False)
            self.ema.to(device)

    def step(self, params: list[torch.nn.Parameter]) -> None:
        if self.ema is not None:
            self.ema.step(params)

    def __call__(self, unet: torch.nn.Module, *args, **kwargs):
        if self.ema is None:
            return unet(*args, **kwargs)
        return torch.func.functional_call(unet, dict(zip(self.names, self.ema.shadow_params)), args, kwargs)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module, adapters: bool = True):
    """`module` in eval mode (every submodule's own flag restored after), its LoRA adapters off with `adapters=False`."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    if not adapters:
        module.disable_adapters()
    try:
        yield module
    finally:
        if not adapters:
            module.enable_adapters()
        for m, training in modes.items():
            m.training = training


# ----------------------------------------------------------------------------- the loop


def distill(cfg: DistillConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    loop, cc = cfg.train, cfg.consistency
    accelerator = make_accelerator(loop, out_dir)
    # --- teacher and data: the cache must be the teacher's VAE's (checked before the run directory is made)
    teacher = load_teacher(cfg)
    try:
        cache = open_cache(cfg.cache, "train", expect=vae_identity(teacher.vae))
    except CacheMismatchError as err:
        raise CacheMismatchError(f"the student trains on the teacher's latents, encoded by the teacher's VAE "
                                 f"({teacher.path}/vae); this cache is not: {err}") from None
    latent_hw = most_common_size(cache)
    log = start_run(accelerator, cfg, out_dir, "distill")
    torch.manual_seed(loop.seed)
    device = accelerator.device
    solver = make_solver(teacher.base_scheduler_config, cc)
    kind = teacher.base_scheduler_config.get("prediction_type", "epsilon")
    accelerator.print(f"distilling {teacher.path} ({kind}): {solver.record()['solver']} solver, a grid of "
                      f"{len(solver.grid)} steps; guidance {cfg.guidance.w_min}-{cfg.guidance.w_max}, "
                      f"{'LoRA rank ' + str(cfg.lora.rank) if cfg.lora.rank else 'full weights'}")

    # --- models: frozen teacher and text encoder; the student (full, or LoRA on the teacher's own U-Net)
    text_encoder, tokenizer = teacher.text_encoder.to(device), teacher.tokenizer
    if cfg.lora.rank:
        unet = teacher.unet  # the teacher is this U-Net with its adapters off
        trainable = add_lora(unet, cfg.lora)
    else:
        unet = student_unet(teacher.unet, cfg.guidance.embedding_dim)
        trainable = list(unet.parameters())
        teacher.unet.to(device).eval()
    unet.to(device)
    optimizer = make_optimizer(trainable, loop)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(loop))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    register_schedule(accelerator, lr_sched)
    raw = accelerator.unwrap_model(unet)
    target = TargetNetwork(raw, cc.target_decay, device)
    if target.ema is not None:
        accelerator.register_for_checkpointing(target.ema)
    ema = make_ema(trainable, loop, device)  # the exported weights' average (train.ema_decay), as stage 3's
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    with torch.no_grad():
        empty = encode_prompts(text_encoder, tokenizer, [""], clip_skip=teacher.clip_skip)
    use_cached_text = cache.text_matches(text_identity(text_encoder, tokenizer, teacher.clip_skip))
    teacher_unet = (lambda: evaluating(raw, adapters=False)) if cfg.lora.rank else (lambda: evaluating(teacher.unet))
    no_grad_autocast = (lambda: torch.autocast(device.type, dtype=AUTOCAST_DTYPES[cc.teacher_dtype])
                        if cc.teacher_dtype else accelerator.autocast())

    # --- resume: the step fixes the data position and every random draw after it
    step, guard = resume(accelerator, out_dir, cfg.resume, loop.max_nonfinite_steps)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = size_batches(cache.size_groups(), loop.batch_size, loop.seed, step * loop.grad_accum, rank, world)

    def train_step(step: int) -> dict:
        losses = []
        for micro in range(loop.grad_accum):
            indices = next(batches)
            gen = sample_generators(loop.seed, step, micro, rank * len(indices), len(indices))
            z, cond, n, w = distill_inputs(cfg, cache, indices, gen, solver, text_encoder, tokenizer, teacher.clip_skip,
                                           device, use_cached_text)
            path = solver.path[n].T.to(device)  # t, the solver's intermediate times, s
            t, s = path[0], path[-1]
            noise = randn_tensor(z.shape, generator=gen, device=z.device, dtype=z.dtype)
            x_t = solver.noised(z, noise, t)
            w_emb = (guidance_embedding(w, cfg.guidance.embedding_dim).to(device, z.dtype)
                     if cfg.guidance.embedding_dim else None)
            if cc.on_policy:
                own = (uniform(gen) < cc.on_policy).to(device)
                top = torch.full_like(n, len(solver.grid) - 1)  # the others are rolled out no further than pure noise
                with torch.no_grad(), evaluating(raw), no_grad_autocast():
                    rolled = sampler_inputs(raw, solver, z, torch.where(own.to(n.device), n, top), cond, w_emb, gen)
                x_t = torch.where(own.view(-1, 1, 1, 1), rolled, x_t)
            with accelerator.accumulate(unet):
                online = solver.consistency(unet(x_t, t, cond, timestep_cond=w_emb).sample, x_t, t)
                with torch.no_grad():
                    x_s = teacher_step(teacher_unet, solver, x_t, path, cond, empty,
                                       lambda time: guided_scales(solver, solver.model_timestep(time), w, cfg),
                                       no_grad_autocast, heun=cc.solver_order == 2, multistep=cc.multistep)
                    with evaluating(raw), no_grad_autocast():
                        pred = target(raw, x_s, solver.model_timestep(s), cond, timestep_cond=w_emb).sample
                    goal = solver.consistency(pred.float(), x_s, s)
                loss = pseudo_huber(online, goal, cc.huber_c)
                if guard.ok(loss):
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and loop.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, loop.max_grad_norm)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        lr = lr_sched.get_last_lr()[0]
        lr_sched.step()  # once per optimiser step
        target.step(trainable)
        if ema is not None:
            ema.step(trainable)
        return {"loss": torch.stack(losses).float().mean(), "lr": lr}

    def evaluate(step: int) -> None:
        with swapped_ema(ema, trainable):
            sample_grid(cfg, raw, teacher, solver, latent_hw, out_dir / "samples" / f"step-{step:06d}.png")

    def export(step: int) -> None:
        """The (EMA) student with an LCMScheduler; LoRA: merged, and the adapters alone in lora/."""
        student = raw
        if ema is not None:
            ema.copy_to(trainable)
        student.eval()
        sample_grid(cfg, student, teacher, solver, latent_hw, out_dir / "samples" / f"step-{step:06d}.png")
        if cfg.lora.rank:
            save_lora(student, out_dir / "lora", name=out_dir.resolve().name)
            student = merge_lora(student)
        export_student(cfg, student, teacher, solver, latent_hw, out_dir / "pipeline")

    unet.train()
    run_loop(accelerator, loop, out_dir, log, guard, step, "distill", train_step, evaluate, export)
    return out_dir / "pipeline"


def distill_inputs(cfg: DistillConfig, cache: LatentCache, indices: list[int], gen: list[torch.Generator],
                   solver: Solver, text_encoder, tokenizer, clip_skip: int, device, use_cached_text: bool):
    """(latents, text conditioning, indices of the grid timesteps t in solver.grid, guidance scales w) of a
    micro-batch, each sample's draws
    from its own generator: flip, posterior sample, caption, then t and w. No caption dropout: the
    guidance the dropout trained for is the teacher's, and the student learns its result."""
    flip = random_flips(cache, gen)
    z = cache.latents(indices, generator=gen, mode=cfg.latent_sample == "mode", flip=flip).to(device)
    rngs = [random.Random(int(torch.randint(0, 2**31, (1,), generator=g))) for g in gen]
    prompts = [process_caption(cache.captions[i], cfg.captions, r) for i, r in zip(indices, rngs)]
    cond = cache.text_embeddings(prompts) if use_cached_text else None
    if cond is None:
        with torch.no_grad():
            cond = encode_prompts(text_encoder, tokenizer, prompts, clip_skip=clip_skip)
    n = torch.cat([torch.randint(0, len(solver.grid), (1,), generator=g) for g in gen])
    low, high = cfg.guidance.w_min, cfg.guidance.w_max
    w = low + (high - low) * uniform(gen)
    return z, cond.to(device, z.dtype), n, w


def sampler_inputs(student, solver: Solver, like: torch.Tensor, n: torch.Tensor, cond: torch.Tensor, w_emb,
                   gen: list[torch.Generator]) -> torch.Tensor:
    """x at each item's grid point n (an index into solver.grid) as the student's own sampler, stepping every grid
    point, reaches it: pure noise at the top, then at each point the consistency function's x0 re-noised with fresh
    noise to the point below, as LCMScheduler steps. Each point is one pass over the items still above theirs."""
    x = randn_tensor(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    n = n.to(like.device)
    for level in range(len(solver.grid) - 1, 0, -1):
        fresh = randn_tensor(like.shape, generator=gen, device=like.device, dtype=like.dtype)  # drawn for all: resumable
        rows = (n < level).nonzero().flatten()
        if not len(rows):
            continue
        t = solver.grid[level].expand(len(rows)).to(like.device)
        pred = student(x[rows], t, cond[rows], timestep_cond=None if w_emb is None else w_emb[rows]).sample.float()
        x0 = solver.consistency(pred, x[rows], t)
        x[rows] = solver.noised(x0, fresh[rows], solver.grid[level - 1].expand(len(rows)).to(like.device)).to(x.dtype)
    return x


def guided_scales(solver: Solver, t: torch.Tensor, w: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """The scale the teacher guides each sample's solver step with: w inside `guidance.interval` (the noise level
    at t), 1 (its conditional prediction alone) outside, as `ldm.sampling.denoise` samples with an interval."""
    if cfg.guidance.interval is None:
        return w
    lo, hi = cfg.guidance.interval
    level = solver.noise_level(t).to(w.device)
    return torch.where((level > lo) & (level <= hi), w, torch.ones_like(w))


def teacher_step(teacher_unet, solver: Solver, x: torch.Tensor, path: torch.Tensor, cond: torch.Tensor,
                 empty: torch.Tensor, scales, autocast, heun: bool = False, multistep: bool = False) -> torch.Tensor:
    """x_s: the solver's steps along `path` (times per item, rows t, ..., s) with the teacher's classifier-free
    guided prediction at `scales(time)` (uncond + w (cond - uncond), one batch of both; x0 and eps are linear in
    it, so guiding the prediction guides both, as LCM's eq. 9 guides each). `heun`: each step with Heun's
    correction, a second guided prediction at its end; `multistep`: each step after the first DPM-Solver++(2M)'s,
    from the x0 of the step before (`multistep_update`). `autocast()`: the context the passes run in."""
    with teacher_unet() as unet, autocast():
        def guided(x, time):
            both = unet(torch.cat([x, x]), torch.cat([time, time]), torch.cat([empty.expand_as(cond), cond])).sample.float()
            uncond, text = both.chunk(2)
            return uncond + scales(time).to(x.device, x.dtype).view(-1, *[1] * (x.ndim - 1)) * (text - uncond)

        before = None  # (time, x0) of the step before, for the multistep update
        for a, b in zip(path[:-1], path[1:]):
            prediction = guided(x, a)
            x0 = solver.denoised(prediction, x, a) if multistep else None
            x_b = multistep_update(solver, x, a, b, x0, *before) if before else solver.update(prediction, x, a, b)
            before = (a, x0) if multistep else None
            if heun:
                x_b = solver.corrected(x, a, b, prediction, x_b, guided(x_b, solver.model_timestep(b)))
            x = x_b
    return x


# ----------------------------------------------------------------------------- validation and export


@torch.no_grad()
def sample_grid(cfg: DistillConfig, unet, teacher: Pipeline, solver: Solver, latent_hw: tuple[int, int], path: Path) -> None:
    """One row per (step count, prompt), one column per seed, sampled by LCMScheduler at the recommended scale."""
    val = cfg.validation
    if not (val.prompts and val.seeds and val.steps):
        return
    device = next(unet.parameters()).device
    prompts = [p for p in val.prompts for _ in val.seeds]
    seeds = [s for _ in val.prompts for s in val.seeds]
    cond = encode_prompts(teacher.text_encoder, teacher.tokenizer, prompts, clip_skip=teacher.clip_skip)
    uncond = encode_prompts(teacher.text_encoder, teacher.tokenizer, [""] * len(prompts), clip_skip=teacher.clip_skip)
    images = []
    with evaluating(unet):
        for steps in val.steps:
            scheduler = solver.sampling_scheduler()
            generators = seeded_generators(seeds)
            noise = initial_noise((len(prompts), unet.config.in_channels, *latent_hw), generators, device, cond.dtype)
            latents = denoise(unet, scheduler, cond, uncond, noise, num_steps=steps,
                              guidance_scale=cfg.recommended_guidance, generator=generators)
            images.append(decode_latents(teacher.vae.to(device), latents).cpu())
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(torch.cat(images) * 2 - 1, nrow=len(val.seeds)).save(path)


def export_student(cfg: DistillConfig, unet, teacher: Pipeline, solver: Solver, latent_hw: tuple[int, int],
                   path: Path) -> None:
    """A StableDiffusionPipeline directory (the student's U-Net, the teacher's VAE, text encoder and tokenizer, the
    solver's saved scheduler: the LCMScheduler trained for, or a flow student's `flow-ddim`) that diffusers samples as it is, plus `ldm.json`: the "consistency" record and
    the recommended sampling, which infer.py and app.py take as their defaults."""
    pipe = StableDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                                   unet=unet, scheduler=solver.saved_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    record = _ldm_record(resolve_pipeline_dir(cfg.teacher))
    factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    info = {
        "objective": solver.objective,
        "clip_skip": teacher.clip_skip,
        "training_scheduler": (student_schedule(teacher.base_scheduler_config, cfg.consistency)
                               if solver.objective == "diffusion" else teacher.base_scheduler_config),
        "latent_size": list(latent_hw),
        "image_size": [s * factor for s in latent_hw],
        "sampling": {"scheduler": solver.sampler, "steps": cfg.sample_steps, "guidance_scale": cfg.recommended_guidance},
        "consistency": {
            "method": "lcm",                                 # latent consistency distillation (Luo et al. 2023)
            "teacher": str(cfg.teacher),
            "teacher_prediction_type": teacher.base_scheduler_config.get("prediction_type", "epsilon"),
            "guidance": {"w_min": cfg.guidance.w_min, "w_max": cfg.guidance.w_max,
                         "embedding_dim": cfg.guidance.embedding_dim, "interval": cfg.guidance.interval,
                         "embedding_of": "guidance_scale - 1 (diffusers' timestep_cond)"},
            **solver.record(), "solver_steps": cfg.consistency.solver_steps,
            "solver_substeps": cfg.consistency.solver_substeps, "solver_order": cfg.consistency.solver_order,
            "multistep": cfg.consistency.multistep, "on_policy": cfg.consistency.on_policy,
            "timestep_scaling": cfg.consistency.timestep_scaling if solver.objective == "diffusion" else None,
            "target_decay": cfg.consistency.target_decay, "huber_c": cfg.consistency.huber_c,
            "lora": to_dict(cfg.lora) if cfg.lora.rank else None,  # merged into unet/; the adapters alone in ../lora/
            "steps": cfg.train.steps, "ema_decay": cfg.train.ema_decay,
        },
        "split": record.get("split"),
        "train_config": to_dict(cfg),
    }
    save_pipeline(pipe, path, info)
