"""A small pixel-space denoiser trained in the background, for the app's Train tab (and notebooks).

    trainer = ToyTrainer()
    trainer.start(ToySettings(schedule="cosine", objective="v_prediction", steps=300))
    trainer.status()          # state, step k/N, the losses so far, the latest preview grid
    trainer.stop()            # the model is kept
    result = trainer.sample("ddim", steps=25, seed=0)      # x_t and predicted x_0 along the way
    rows = trainer.compare([0, 250, 500, 750, 999])         # x_t and the model's x_0 at each t

What the course texts call "train a denoising network": an unconditional diffusers UNet2DModel on
32 px RGB images, with no VAE and no text, so a few hundred steps on a laptop's CPU (a minute or
two) turn noise into coloured blobs on a background, and every choice the learner makes
(schedule, objective, steps, learning rate) shows in the loss curve and the samples as it trains. The process is
the one the real stage-3 trainer runs (`ldm.diffusion.noised_inputs`: DDPM's forward process
with an epsilon or v target, or rectified flow), and sampling goes through the denoising loop
users run (`ldm.sampling.denoise`) with any sampler of the registry that fits the objective.

One training at a time per `ToyTrainer`: a second `start` while one runs raises `TrainerBusy`,
whose message says whose run it is and how far it got. Sizes are bounded (`ToyLimits`) and
checked before any work starts. The model lives in memory only: a toy, not an artifact.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image

from ldm.diffusion import NoiseConfig, make_train_scheduler, noised_inputs, scheduler_config
from ldm.sampling import add_noise, denoise, initial_noise, make_scheduler, predicted_x0, seeded_generators

RESOLUTION = 32          # px: fixed, so every run costs about the same
SHAPES = "shapes"        # the embedded synthetic dataset (ldm.data.shapes), drawn in-process

# The schedules a learner picks from, as NoiseConfig keys. "linear" is DDPM's pixel-space schedule
# (Ho et al. 2020: beta from 1e-4 to 0.02), not SD's latent one; "scaled_linear" is SD's
# (linear in sqrt(beta), 0.00085 to 0.012); "cosine" is Nichol & Dhariwal 2021 (diffusers' name:
# squaredcos_cap_v2).
SCHEDULES: dict[str, dict] = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear": dict(beta_schedule="scaled_linear"),
}
# What the network learns to predict: the noise (Ho et al. 2020), v = sqrt(abar) eps - sqrt(1 - abar) x0
# (Salimans & Ho 2022), or the velocity eps - x0 of rectified flow (Esser et al. 2024), which has no
# beta schedule.
OBJECTIVES: dict[str, dict] = {
    "epsilon": dict(prediction_type="epsilon"),
    "v_prediction": dict(prediction_type="v_prediction"),
    "flow": dict(objective="flow"),
}
# The sampler of the preview grids drawn while training.
PREVIEW_SAMPLERS = {"diffusion": "ddim", "flow": "flow-euler"}
PREVIEW_STEPS = 20       # sampler steps per preview
PREVIEW_IMAGES = 16      # images per preview grid (4 x 4), always from the same noise

# The denoiser: 0.6 M parameters, 32 -> 16 -> 8 px, no attention, so one step of a batch of 16 takes
# 0.1-0.3 s on one CPU core (channels 32, 64, 64 would cost twice that).
TOY_UNET: dict = dict(
    sample_size=RESOLUTION, in_channels=3, out_channels=3,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
)


class TrainerBusy(RuntimeError):
    """A training is already running; the message says whose and how far it is."""


@dataclasses.dataclass
class ToyLimits:
    """Bounds on one training, so a visitor of a shared server cannot take the machine."""

    max_steps: int = 2000      # optimiser steps
    max_batch: int = 64        # images per step
    max_images: int = 2000     # dataset size: shapes drawn, or images read from a folder

    def validate(self) -> None:
        for name in ("max_steps", "max_batch", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


LR_RANGE = (1e-6, 1e-1)  # a learning rate outside it is a typo, not an experiment


@dataclasses.dataclass
class ToySettings:
    """One training, as the learner chose it."""

    data: str = SHAPES           # "shapes", or a folder of images (python -m ldm.data.prepare emoji OUT)
    schedule: str = "cosine"     # a key of SCHEDULES (ignored by objective flow, which has none)
    objective: str = "v_prediction"  # a key of OBJECTIVES (v: cleaner samples than epsilon after a few hundred steps)
    steps: int = 300             # optimiser steps
    lr: float = 2e-3             # AdamW learning rate, constant
    batch_size: int = 16         # images per step
    num_images: int = 1000       # dataset size: shapes drawn, or at most this many read from the folder
    seed: int = 0                # model init, data order, noise; and which shapes are drawn
    preview_every: int = 50      # steps between preview grids (0: only at the end)

    def validate(self, limits: ToyLimits) -> None:
        """Refuse, naming the setting and its bound, anything the trainer would not run."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        _check_int("steps", self.steps, 1, limits.max_steps)
        _check_int("batch size", self.batch_size, 1, limits.max_batch)
        _check_int("images", self.num_images, 1, limits.max_images)
        _check_int("seed", self.seed, 0, 2**31 - 1)
        _check_int("preview every", self.preview_every, 0, limits.max_steps)
        if not (isinstance(self.lr, (int, float)) and LR_RANGE[0] <= self.lr <= LR_RANGE[1]):
            raise ValueError(f"learning rate must be between {LR_RANGE[0]:g} and {LR_RANGE[1]:g}, got {self.lr}")
        if self.data != SHAPES:
            folder_problem = data_folder_problem(self.data)
            if folder_problem:
                raise ValueError(folder_problem)

    def noise(self) -> NoiseConfig:
        return noise_config(self.schedule, self.objective)

    def describe(self) -> str:
        process = "rectified flow" if self.objective == "flow" else f"{self.objective}, {self.schedule} schedule"
        data = SHAPES if self.data == SHAPES else Path(self.data).name
        return (f"{data} ({self.num_images} images), {process}, {self.steps} steps, batch {self.batch_size}, "
                f"lr {self.lr:g}, seed {self.seed}")


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}")


def noise_config(schedule: str, objective: str) -> NoiseConfig:
    """The training process of a schedule and objective (flow has no beta schedule: `schedule` is ignored)."""
    keys = OBJECTIVES[objective] if objective == "flow" else {**SCHEDULES[schedule], **OBJECTIVES[objective]}
    cfg = NoiseConfig(**keys)
    cfg.validate()
    return cfg


def sampling_schedule(cfg: NoiseConfig) -> dict:
    """The scheduler config samplers are built from. Unlike latents, pixels live in [-1, 1]: DDPM and
    DDIM clip their x0 estimate there, as Ho et al. 2020 sampled, which tames an undertrained model."""
    schedule = scheduler_config(cfg)
    return schedule if cfg.objective == "flow" else {**schedule, "clip_sample": True}


def build_toy_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**TOY_UNET)


# ----------------------------------------------------------------------------- data


def data_folder_problem(folder: str) -> str | None:
    """Why `folder` cannot be trained on (missing, not a folder, no images), or None."""
    from ldm.config import ConfigError
    from ldm.data.sources import SourceConfig, open_source

    path = Path(folder)
    if not str(folder).strip():
        return "choose shapes or a folder of images"
    if not path.exists():
        return f"folder {folder} does not exist"
    if not path.is_dir():
        return f"{folder} is not a folder"
    try:
        count = len(open_source(SourceConfig(kind="imagefolder", path=str(path))))
    except ConfigError as err:
        return f"folder {folder}: {err}"
    if count == 0:
        return f"folder {folder} holds no images"
    return None


def load_toy_data(settings: ToySettings) -> torch.Tensor:
    """(N, 3, 32, 32) images in [-1, 1]: shapes drawn with the settings' seed, or the folder's training
    images (a prepared folder's heldout.txt keeps its held-out images out), square-cropped to 32 px."""
    if settings.data == SHAPES:
        from ldm.data.shapes import ShapesDataset
        from ldm.viz import to_tensor

        dataset = ShapesDataset(size=settings.num_images, resolution=RESOLUTION, seed=settings.seed)
        return torch.cat([to_tensor(dataset[i]["image"]) for i in range(len(dataset))])
    from ldm.data.images import DataConfig, load_images
    from ldm.data.sources import SourceConfig
    from ldm.data.transforms import TransformConfig

    heldout = Path(settings.data) / "heldout.txt"
    cfg = DataConfig(source=SourceConfig(kind="imagefolder", path=settings.data),
                     transform=TransformConfig(resolution=RESOLUTION), max_images=settings.num_images,
                     **(dict(heldout=str(heldout)) if heldout.is_file() else dict(eval_size=0)))
    store = load_images(cfg, "train", desc="")
    if not len(store):
        reasons = ", ".join(f"{n} {reason}" for reason, n in store.report.counts.items() if reason != "ok")
        raise ValueError(f"folder {settings.data} holds no readable images ({reasons or 'none found'})")
    return torch.stack([store[i] for i in range(len(store))])


# ----------------------------------------------------------------------------- sampling


class _Unconditional(torch.nn.Module):
    """A UNet2DModel called as `denoise` calls a text-conditioned U-Net (the embeddings are ignored)."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
        return (self.unet(x, t).sample,)


def _to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def sample(unet: UNet2DModel, cfg: NoiseConfig, sampler: str, steps: int, seed: int, num_images: int = 1,
           frames: int = 8) -> dict:
    """Images from noise, with the first image's trajectory: about `frames` snapshots of
    (t, x_t, predicted x_0), as `ldm.viz.reverse_figure` draws them. Returns a dict with
    "images" (PIL), "image" (the first), "trajectory", "scheduler", "steps", "seed", "prompt"."""
    scheduler = make_scheduler(sampler, sampling_schedule(cfg))
    generators = seeded_generators([seed + i for i in range(num_images)])  # image i: seed + i, as ldm.infer
    noise = initial_noise((num_images, 3, RESOLUTION, RESOLUTION), generators, "cpu", torch.float32)
    every = max(1, math.ceil(steps / frames))
    trajectory = []

    def record(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i % every == 0 and i < steps - 1:
            trajectory.append((t, _to_pil(x[0]), _to_pil(x0[0])))

    was_training = unet.training
    unet.eval()
    try:
        x = denoise(_Unconditional(unet), scheduler, torch.zeros(num_images, 1, 1), None, noise, num_steps=steps,
                    generator=generators, callback=record)
    finally:
        unet.train(was_training)
    images = [_to_pil(image) for image in x]
    return dict(images=images, image=images[0], trajectory=trajectory, scheduler=sampler, steps=steps, seed=seed,
                prompt="unconditional")


@torch.no_grad()
def compare_timesteps(unet: UNet2DModel, cfg: NoiseConfig, x0: torch.Tensor, timesteps: list[int],
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """What the model makes of one image at each noise level: rows "x_0", "x_t" (the image noised to
    t with one shared eps) and "predicted x_0", each (len(timesteps), 3, H, W) in [0, 1], as
    `ldm.viz.forward_figure` draws them. Flow: x_t = (1 - t/T) x0 + (t/T) eps."""
    scheduler = make_train_scheduler(cfg)
    t = torch.as_tensor(timesteps, dtype=torch.long)
    eps = torch.randn(x0[None].shape, generator=torch.Generator().manual_seed(seed)).expand(len(t), -1, -1, -1)
    clean = x0[None].expand(len(t), -1, -1, -1)
    noisy = add_noise(scheduler, clean, eps, t)
    was_training = unet.training
    unet.eval()
    try:
        pred = unet(noisy, t).sample
    finally:
        unet.train(was_training)
    x0_hat = torch.stack([predicted_x0(scheduler, noisy[i:i + 1], pred[i:i + 1], t[i])[0] for i in range(len(t))])
    show = lambda x: ((x + 1) / 2).clamp(0, 1)  # noqa: E731
    return {"x_0": show(clean), "x_t": show(noisy), "predicted x_0": show(x0_hat)}


# ----------------------------------------------------------------------------- the trainer


@dataclasses.dataclass
class ToyStatus:
    """What the page shows: a copy, safe to read while training goes on."""

    state: str                       # idle | loading | running | stopping | stopped | done | failed
    step: int = 0                    # optimiser steps done
    total: int = 0                   # steps asked for
    losses: list[float] = dataclasses.field(default_factory=list)  # one per step done
    preview: Image.Image | None = None   # the latest sample grid
    preview_step: int = 0            # the step it was drawn at
    message: str = ""                # what went wrong, or how the run ended
    settings: ToySettings | None = None
    owner: str | None = None         # who started it (the app: a browser session)
    run: int = 0                     # counts the runs started, so a page can tell a new run from the last
    seconds: float = 0.0             # since the run started

    @property
    def running(self) -> bool:
        return self.state in ("loading", "running", "stopping")


class ToyTrainer:
    """Trains one toy denoiser at a time in a background thread; `stop` keeps the model.

    Thread safety: the training thread holds `_model_lock` for each optimiser step, and a sample
    or comparison takes a copy of the model under it, so either sees the weights between two steps;
    `_lock` guards the status fields.
    """

    def __init__(self, limits: ToyLimits | None = None):
        self.limits = limits or ToyLimits()
        self.limits.validate()
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status = ToyStatus("idle")
        self._unet: UNet2DModel | None = None
        self._noise: NoiseConfig | None = None
        self._data: torch.Tensor | None = None
        self._started = 0.0

    # --- control

    def start(self, settings: ToySettings, owner: str | None = None) -> ToyStatus:
        """Validate `settings` and start training in the background; raises ValueError for bad
        settings and TrainerBusy while another training runs."""
        settings.validate(self.limits)
        with self._lock:
            if self._status.running:
                raise TrainerBusy(self.busy_message(owner))
            self._stop.clear()
            self._started = time.monotonic()
            self._status = ToyStatus("loading", total=settings.steps, settings=settings, owner=owner,
                                     run=self._status.run + 1, message="drawing the images" if settings.data == SHAPES
                                     else "reading the folder")
            self._thread = threading.Thread(target=self._train, args=(settings,), name="toy-trainer", daemon=True)
            self._thread.start()
        return self.status()

    def busy_message(self, owner: str | None = None) -> str:
        s = self._status
        whose = "your training" if owner is not None and owner == s.owner else "a training started by another visitor"
        return f"busy: {whose} is running (step {s.step}/{s.total})"

    def stop(self, owner: str | None = None) -> ToyStatus:
        """Ask the running training to stop after its current step; the model is kept. Only the
        visitor who started it may stop it (`owner` None: anyone, as from Python)."""
        with self._lock:
            s = self._status
            if not s.running:
                return copy.copy(s)
            if owner is not None and s.owner is not None and owner != s.owner:
                raise TrainerBusy(f"{self.busy_message(owner)}; only the visitor who started it can stop it, "
                                  f"and it ends by itself after step {s.total}")
            s.state = "stopping"
            self._stop.set()
        return self.status()

    def wait(self, timeout: float | None = None) -> ToyStatus:
        """Block until the training thread ends (or `timeout` seconds pass)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()

    def status(self) -> ToyStatus:
        with self._lock:
            s = dataclasses.replace(self._status, losses=list(self._status.losses))
        if s.running:
            s.seconds = time.monotonic() - self._started
        return s

    # --- the model, after or during training

    def model(self) -> tuple[UNet2DModel, NoiseConfig]:
        """A copy of the current model (between two steps, if training runs) and its noise config."""
        with self._model_lock:
            if self._unet is None:
                raise ValueError("no model yet: train one first (Start)")
            return copy.deepcopy(self._unet).eval(), self._noise

    def noise(self) -> NoiseConfig:
        """The training process of the current model."""
        with self._model_lock:
            if self._noise is None:
                raise ValueError("no model yet: train one first (Start)")
            return self._noise

    def sample(self, sampler: str, steps: int, seed: int = 0, num_images: int = 8) -> dict:
        """`sample` with the current model (see there)."""
        unet, cfg = self.model()
        return sample(unet, cfg, sampler, steps, seed, num_images)

    def compare(self, timesteps: list[int], image: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        """`compare_timesteps` with the current model, on training image number `image`."""
        with self._model_lock:
            data = self._data
        unet, cfg = self.model()
        if not 0 <= image < len(data):
            raise ValueError(f"image must be between 0 and {len(data) - 1} (the training images), got {image}")
        return compare_timesteps(unet, cfg, data[image], timesteps, seed)

    # --- the training thread

    def _set(self, **fields) -> None:
        with self._lock:
            for key, value in fields.items():
                setattr(self._status, key, value)

    def _train(self, settings: ToySettings) -> None:
        try:
            self._run(settings)
        except Exception as err:  # noqa: BLE001  (shown on the page; the server goes on)
            self._set(state="failed", message=f"{type(err).__name__}: {err}")

    def _run(self, settings: ToySettings) -> None:
        # --- set up: data, model, process, optimiser
        data = load_toy_data(settings)
        cfg = settings.noise()
        scheduler = make_train_scheduler(cfg)
        unet = build_toy_unet(settings.seed).train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr)
        generator = torch.Generator().manual_seed(settings.seed)
        with self._model_lock:
            self._unet, self._noise, self._data = unet, cfg, data
        with self._lock:
            if self._status.state == "loading":   # not if Stop was pressed meanwhile
                self._status.state, self._status.message = "running", ""
        # --- loop: one step of the stage-3 objective on pixels, a preview grid now and then
        for step in range(1, settings.steps + 1):
            if self._stop.is_set():
                break
            x0 = data[torch.randint(0, len(data), (settings.batch_size,), generator=generator)]
            with self._model_lock:
                noisy, t, target, _ = noised_inputs(scheduler, cfg, x0, generator)
                loss = torch.nn.functional.mse_loss(unet(noisy, t).sample, target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss is {loss.item()} at step {step}: lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
            with self._lock:
                self._status.step = step
                self._status.losses.append(loss.item())
            if step == settings.steps or settings.preview_every and step % settings.preview_every == 0:
                self._preview(step)
        # --- end: the model stays for sampling
        step = self.status().step
        stopped = step < settings.steps
        if stopped and step and self.status().preview_step != step:
            self._preview(step)   # the grid of the model as it was stopped
        self._set(state="stopped" if stopped else "done", seconds=time.monotonic() - self._started,
                  message="the model is kept: sample it below" if stopped else "the model is ready: sample it below")

    def _preview(self, step: int) -> None:
        """A grid of PREVIEW_IMAGES samples, always from the same noise, so the learner sees the same
        images emerge as training goes on."""
        from ldm.data.images import image_grid

        with self._model_lock:
            unet, cfg = self._unet, self._noise
            result = sample(unet, cfg, PREVIEW_SAMPLERS[cfg.objective], PREVIEW_STEPS, seed=0,
                            num_images=PREVIEW_IMAGES, frames=1)
        self._set(preview=image_grid(result["images"], nrow=4), preview_step=step)


def loss_records(losses: list[float]) -> list[dict]:
    """The losses as metrics records, as `ldm.viz.curves_figure` reads a metrics.jsonl."""
    return [{"step": i + 1, "loss": value} for i, value in enumerate(losses) if np.isfinite(value)]
