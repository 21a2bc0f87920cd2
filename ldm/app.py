"""A web demo on a trained pipeline: text-to-image with its denoising steps, the forward process, and training.

    python app.py runs/demo/ldm [--port 7860] [--max-steps 50 --max-size 512 --max-images 4]
    python app.py [--train-data data/emoji-64] [--train-max-steps 2000]      # the Train tab only

Gradio, because the demo is a form of model inputs and a gallery of images, which Gradio's
components are; it serves a queue (one generation at a time here), a Python API, and needs no
front-end code of ours. Tab 1 generates through `ldm.infer.generate` (the sampler users run)
and draws the trajectory; tab 2 noises an uploaded image, or a freshly drawn shapes scene,
with the closed-form q(x_t | x_0) in pixel and latent space (`ldm.viz`). The Train tab trains a small
pixel-space denoiser on shapes or a prepared folder in a background thread (`ldm.train.toy`), shows
its loss curve and samples while it trains, and samples it step by step afterwards.

Safety: it listens on 127.0.0.1 unless told otherwise, and one request cannot exhaust the
machine: steps, image side and images per request are bounded (`Limits`, set on the command
line) and checked on the server, since an API client does not go through the page's sliders;
requests beyond a bound are refused with a message that names it. Generations run one at a
time from a bounded queue, and uploads are capped in size. One training runs at a time per server,
with bounded steps and batch (`--train-max-steps`, `--train-max-batch`), on shapes or on the folders
the command line names (`--train-data`): a visitor cannot point it at another folder of the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from PIL import Image

from ldm.diffusion import make_train_scheduler, objective_of
from ldm.sampling import SCHEDULERS, make_scheduler
from ldm.train.toy import (OBJECTIVES, PREVIEW_SAMPLERS, SCHEDULES, SHAPES, ToyLimits, ToySettings, ToyTrainer,
                           TrainerBusy, data_folder_problem, loss_records)
from ldm.viz import (BETA_SCHEDULES, DEFAULT_TIMESTEPS, curves_figure, figure_to_image, forward_figure, forward_rows,
                     noise_config, parse_timesteps, reverse_figure, reverse_process, schedule_curves, schedule_label,
                     schedules_figure, shapes_image, standard_schedules)

PIPELINE_SCHEDULE = "this pipeline's training schedule"
TRAJECTORY_FRAMES = 8      # snapshots of the denoising shown per generation
MAX_GUIDANCE = 30.0
DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 3.0  # the page's first values for a pipeline that recommends none


@dataclasses.dataclass
class Limits:
    """Per-request bounds, so a single request stays within a known cost."""

    max_steps: int = 50       # sampler steps
    max_size: int = 512       # width and height, pixels
    max_images: int = 4       # images per request
    max_queue: int = 16       # requests waiting; more are turned away
    max_upload: str = "10mb"  # largest uploaded file

    def validate(self) -> None:
        for name in ("max_steps", "max_size", "max_images", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class RequestError(ValueError):
    """A request outside the server's limits or otherwise unusable; shown to the user as is."""


def size_multiple(pipe) -> int:
    """Image sides must divide down through the VAE and then every UNet downsampling."""
    return pipe.vae_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def check_generation(limits: Limits, multiple: int, schedulers: list[str], *, steps: int, width: int, height: int,
                     num_images: int, guidance_scale: float, scheduler: str) -> None:
    """Refuse, naming the bound, any request the server would not run."""
    if not 1 <= steps <= limits.max_steps:
        raise RequestError(f"steps must be between 1 and {limits.max_steps} (the server's --max-steps), got {steps}")
    if not 1 <= num_images <= limits.max_images:
        raise RequestError(f"images must be between 1 and {limits.max_images} (the server's --max-images), got {num_images}")
    for name, side in (("width", width), ("height", height)):
        if not multiple <= side <= limits.max_size:
            raise RequestError(f"{name} must be between {multiple} and {limits.max_size} (the server's --max-size), got {side}")
        if side % multiple:
            raise RequestError(f"{name} must be a multiple of {multiple} for this pipeline, got {side}")
    if not 0 <= guidance_scale <= MAX_GUIDANCE:
        raise RequestError(f"guidance scale must be between 0 and {MAX_GUIDANCE}, got {guidance_scale}")
    if scheduler not in schedulers:
        raise RequestError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedulers)}")


def usable_schedulers(schedule: dict) -> list[str]:
    """The registry's samplers that can sample this training schedule here: make_scheduler refuses
    one that cannot apply zero-terminal-SNR rescaling, and dpm++sde without torchsde installed."""
    usable = []
    for name in SCHEDULERS:
        try:
            make_scheduler(name, schedule)
        except (ValueError, ImportError):
            continue
        usable.append(name)
    return usable


class Demo:
    """What the page does, in plain Python: the Gradio callbacks are these methods."""

    def __init__(self, pipe, limits: Limits):
        limits.validate()
        self.pipe, self.limits = pipe, limits
        self.multiple = size_multiple(pipe)
        if limits.max_size < self.multiple:
            raise ValueError(f"max_size {limits.max_size} is below the smallest image this pipeline makes ({self.multiple} px)")
        self.default_size = min(pipe.native_size, limits.max_size // self.multiple * self.multiple)
        # a flow model (noise.objective=flow) has no beta schedule: its forward process is not this tab's q(x_t | x_0)
        self.flow = objective_of(pipe.base_scheduler_config) == "flow"
        self.training_schedule = None if self.flow else training_scheduler(pipe.base_scheduler_config)
        self.forward_schedules = [*([] if self.flow else [PIPELINE_SCHEDULE]), *BETA_SCHEDULES]
        self.schedulers = usable_schedulers(pipe.base_scheduler_config)
        # a pipeline's recommended sampling (ldm.json: a distilled one's few steps and its distilled scale), else the page's
        self.default_steps = pipe.default_steps if pipe.sampling else DEFAULT_STEPS
        self.default_guidance = pipe.default_guidance if pipe.sampling else DEFAULT_GUIDANCE

    def generate(self, prompt: str, negative_prompt: str, scheduler: str, steps, guidance_scale, seed, width, height,
                 num_images) -> tuple[list[tuple[Image.Image, str]], Image.Image, str]:
        """(images with captions, the first image's denoising strip, a summary line)."""
        steps, width, height, num_images, seed = (int(v) for v in (steps, width, height, num_images, seed))
        check_generation(self.limits, self.multiple, self.schedulers, steps=steps, width=width, height=height, num_images=num_images,
                         guidance_scale=float(guidance_scale), scheduler=scheduler)
        if not 0 <= seed < 2**63 - num_images:   # torch generators take 64-bit seeds
            raise RequestError(f"seed must be between 0 and 2**63 - {num_images + 1}, got {seed}")
        start = time.perf_counter()
        results = [reverse_process(self.pipe, prompt, seed=seed + i, steps=steps, frames=TRAJECTORY_FRAMES,
                                   negative_prompts=[negative_prompt], scheduler=scheduler,
                                   guidance_scale=float(guidance_scale), width=width, height=height)
                   for i in range(num_images)]
        seconds = time.perf_counter() - start
        gallery = [(r["image"], f"seed {r['seed']}") for r in results]
        interval = results[0]["guidance_interval"]  # the pipeline's recommended one (ldm.json), if any
        where = f" at noise levels ({interval[0]}, {interval[1]}]" if interval else ""
        summary = (f"{num_images} image(s), {width}x{height}, {scheduler}, {steps} steps, guidance {guidance_scale}{where}: "
                   f"{seconds:.1f} s")
        return gallery, figure_to_image(reverse_figure(results[0])), summary

    def forward(self, image: Image.Image | None, schedule: str, zero_snr: bool, timesteps: str, latent: bool,
                seed) -> Image.Image:
        """The forward strip of `image` (square-cropped to the pipeline's native size)."""
        if image is None:
            raise RequestError("upload an image or draw a shapes scene first")
        scheduler, label = self._schedule(schedule, zero_snr)
        steps = parse_timesteps(timesteps, scheduler.config.num_train_timesteps)
        rows = forward_rows(square(image, self.default_size), scheduler, steps,
                            vae=self.pipe.vae if latent else None, seed=int(seed))
        return figure_to_image(forward_figure(rows, scheduler, steps, label))

    def shapes(self, seed) -> Image.Image:
        return shapes_image(int(seed), self.default_size)

    def schedules_plot(self) -> Image.Image:
        curves = standard_schedules() + ([] if self.flow else [schedule_curves(self.training_schedule, "this pipeline")])
        return figure_to_image(schedules_figure(curves))

    def _schedule(self, schedule: str, zero_snr: bool):
        if schedule == PIPELINE_SCHEDULE and self.flow:
            raise RequestError("this pipeline was trained with noise.objective=flow, x_t = (1 - t) x0 + t eps, which has "
                               f"no beta schedule to show; choose one of {BETA_SCHEDULES}")
        if schedule == PIPELINE_SCHEDULE:
            return self.training_schedule, "this pipeline's training schedule"
        if schedule not in BETA_SCHEDULES:
            raise RequestError(f"unknown schedule {schedule!r}; choose one of {(PIPELINE_SCHEDULE,) + BETA_SCHEDULES}")
        cfg = noise_config(schedule, bool(zero_snr))
        return make_train_scheduler(cfg), schedule_label(cfg)


def training_scheduler(config: dict):
    """The DDPM scheduler of a saved training schedule (what the forward process of training was)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({k: v for k, v in dict(config).items() if not k.startswith("_")})


def square(image: Image.Image, side: int) -> Image.Image:
    """Centre-crop to a square and resize, so any upload fits the model's input size."""
    image = image.convert("RGB")
    s = min(image.size)
    left, top = (image.width - s) // 2, (image.height - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((side, side), Image.LANCZOS)


# ----------------------------------------------------------------------------- Train tab

TRAIN_POLL_S = 2.0          # seconds between the Train tab's updates while a training runs
TRAIN_SAMPLE_IMAGES = 8     # images per "Sample" click
TRAIN_MAX_SAMPLE_STEPS = 200
TRAIN_TIMESTEPS = (0, 100, 250, 500, 750, 900, 999)
TRAIN_SHOW_SCALE = 4        # 32 px images are shown enlarged, without smoothing
AUTO_SAMPLER = "auto"       # the objective's preview sampler: ddim, or flow-euler for flow


class TrainTab:
    """The Train tab in plain Python: train a toy pixel-space denoiser (`ldm.train.toy`) on shapes or
    on one of the server's prepared folders, watch it, stop it, sample it. One `ToyTrainer` per
    server, so one training at a time; a visitor is an `owner` (the browser session)."""

    def __init__(self, trainer: ToyTrainer, folders: list[str] = ()):
        self.trainer = trainer
        self.folders: dict[str, str] = {}   # label (the folder's name) -> path
        for folder in folders:
            label = Path(folder).resolve().name
            if label == SHAPES or label in self.folders:
                raise ValueError(f"--train-data {folder}: another choice is already called {label!r}; rename the folder")
            self.folders[label] = str(folder)
        self.data_choices = [SHAPES, *self.folders]
        self.samplers = [AUTO_SAMPLER, *SCHEDULERS]
        self._plot_key, self._plot = None, None   # the loss plot of (run, step), drawn once for every visitor

    def start(self, data: str, schedule: str, objective: str, steps, lr, batch_size, seed, preview_every,
              owner: str | None = None) -> str:
        """The message to show: started, or busy. A bad setting raises ValueError, naming it."""
        if data not in self.data_choices:
            raise RequestError(f"unknown data {data!r}; choose one of {', '.join(self.data_choices)}")
        settings = ToySettings(data=self.folders.get(data, SHAPES), schedule=schedule, objective=objective,
                               steps=_whole(steps, "steps"), lr=_number(lr, "learning rate"),
                               batch_size=_whole(batch_size, "batch size"), seed=_whole(seed, "seed"),
                               preview_every=_whole(preview_every, "preview every"),
                               num_images=min(ToySettings.num_images, self.trainer.limits.max_images))
        try:
            self.trainer.start(settings, owner=owner)
        except TrainerBusy as err:
            return str(err)
        return f"started: {settings.describe()}"

    def stop(self, owner: str | None = None) -> str:
        try:
            status = self.trainer.stop(owner=owner)
        except TrainerBusy as err:
            return str(err)
        return "stopping after this step; the model is kept" if status.running else "no training is running"

    def poll(self) -> tuple[tuple, str, Image.Image | None, Image.Image | None, bool]:
        """(a key that changes when anything shown changes, the status line, the loss plot, the
        preview grid, whether a training runs)."""
        s = self.trainer.status()
        key = (s.run, s.state, s.step, s.preview_step)
        return key, status_line(s), self._loss_plot(s), enlarge(s.preview), s.running

    def _loss_plot(self, s) -> Image.Image | None:
        records = loss_records(s.losses)
        if not records:
            return None
        key = (s.run, len(s.losses))
        if key != self._plot_key:
            self._plot = figure_to_image(curves_figure({"loss": records}, ["loss"]))
            self._plot_key = key
        return self._plot

    def sample(self, sampler: str, steps, seed) -> tuple[Image.Image, Image.Image, str]:
        """(the first image's denoising strip, the samples, a summary line)."""
        steps, seed = _whole(steps, "steps"), _whole(seed, "seed")
        if not 1 <= steps <= TRAIN_MAX_SAMPLE_STEPS:
            raise RequestError(f"sampling steps must be between 1 and {TRAIN_MAX_SAMPLE_STEPS}, got {steps}")
        if not 0 <= seed < 2**62:
            raise RequestError(f"seed must be between 0 and 2**62 - 1, got {seed}")
        if sampler not in self.samplers:
            raise RequestError(f"unknown sampler {sampler!r}; choose one of {', '.join(self.samplers)}")
        if sampler == AUTO_SAMPLER:
            sampler = PREVIEW_SAMPLERS[self.trainer.noise().objective]
        start = time.perf_counter()
        result = self.trainer.sample(sampler, steps, seed, TRAIN_SAMPLE_IMAGES)
        seconds = time.perf_counter() - start
        from ldm.data.images import image_grid

        grid = enlarge(image_grid(result["images"], nrow=TRAIN_SAMPLE_IMAGES // 2))
        summary = (f"{TRAIN_SAMPLE_IMAGES} images, {sampler}, {steps} steps, seeds {seed}..{seed + TRAIN_SAMPLE_IMAGES - 1}: "
                   f"{seconds:.1f} s (the model of {status_line(self.trainer.status(), short=True)})")
        return figure_to_image(reverse_figure(result)), grid, summary

    def compare(self, timesteps: str, image, seed) -> Image.Image:
        """x_0, x_t and the model's predicted x_0 of one training image at each timestep."""
        steps = parse_timesteps(timesteps, 1000, max_count=10)
        rows = self.trainer.compare(steps, _whole(image, "image"), _whole(seed, "seed"))
        scheduler, s = make_train_scheduler(self.trainer.noise()), self.trainer.status()
        title = f"what the model makes of training image {int(image)} at each t (after step {s.step})"
        return figure_to_image(forward_figure(rows, scheduler, steps, title))


def status_line(s, short: bool = False) -> str:
    """"running: step 120/300, loss 0.083, 41 s" and what was chosen."""
    if s.state == "idle":
        return "no training yet: choose the settings and press Start"
    loss = f", loss {sum(s.losses[-20:]) / len(s.losses[-20:]):.4f}" if s.losses else ""   # the last 20 steps' mean
    line = f"{s.state}: step {s.step}/{s.total}{loss}, {s.seconds:.0f} s"
    if short:
        return line
    if s.message:
        line += f": {s.message}"
    return f"**{line}**  \n{s.settings.describe()}" if s.settings else f"**{line}**"


def enlarge(image: Image.Image | None) -> Image.Image | None:
    if image is None:
        return None
    return image.resize((image.width * TRAIN_SHOW_SCALE, image.height * TRAIN_SHOW_SCALE), Image.NEAREST)


def _whole(value, name: str) -> int:
    number = _number(value, name)
    if number != int(number):
        raise RequestError(f"{name} must be a whole number, got {value}")
    return int(number)


def _number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}") from None


def _user_errors(fn):
    """Show a refused request as a message on the page (gr.Error) instead of a stack trace."""
    import functools

    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args):
        try:
            return fn(*args)
        except ValueError as err:
            raise gr.Error(str(err)) from err
    return wrapped


def build_app(demo: Demo, train: TrainTab | None = None):
    """The Gradio Blocks page; element ids (#prompt, #generate, #images, ...) are what the
    browser test drives. With `train`, a Train tab too (`build_train_tab`)."""
    import gradio as gr

    limits, m = demo.limits, demo.multiple
    schedulers = demo.schedulers
    default_scheduler = demo.pipe.default_scheduler if demo.pipe.default_scheduler in schedulers else schedulers[0]
    with gr.Blocks(title="ldm demo", analytics_enabled=False) as app:
        gr.Markdown(f"## ldm demo\n`{demo.pipe.path}`: native size {demo.pipe.native_size} px, "
                    f"at most {limits.max_steps} steps, {limits.max_size} px, {limits.max_images} images per request")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="prompt", elem_id="prompt", lines=2,
                                        value="a large red circle on the left, on a gray background")
                    negative = gr.Textbox(label="negative prompt", elem_id="negative")
                    scheduler = gr.Dropdown(schedulers, value=default_scheduler, label="scheduler", elem_id="scheduler")
                    steps = gr.Slider(1, limits.max_steps, value=min(demo.default_steps, limits.max_steps), step=1,
                                      label="steps", elem_id="steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=demo.default_guidance, step=0.5, label="guidance scale",
                                         elem_id="guidance")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    with gr.Row():
                        width = gr.Slider(m, limits.max_size, value=demo.default_size, step=m, label="width", elem_id="width")
                        height = gr.Slider(m, limits.max_size, value=demo.default_size, step=m, label="height", elem_id="height")
                    num_images = gr.Slider(1, limits.max_images, value=1, step=1, label="images", elem_id="num-images")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    images = gr.Gallery(label="images", elem_id="images", columns=2, format="png")
                    trajectory = gr.Image(label="denoising: x_t and predicted x_0 (first image)", elem_id="trajectory",
                                          type="pil", format="png", interactive=False)
                    summary = gr.Markdown(elem_id="summary")
            run.click(_user_errors(demo.generate), [prompt, negative, scheduler, steps, guidance, seed, width, height, num_images],
                      [images, trajectory, summary], api_name="generate")
        with gr.Tab("Forward process", elem_id="forward-tab"):
            with gr.Row():
                with gr.Column():
                    source = gr.Image(label="image (upload, or draw a shapes scene)", type="pil", elem_id="source",
                                      sources=["upload", "clipboard"], format="png")
                    with gr.Row():
                        shapes_seed = gr.Number(value=0, precision=0, label="shapes seed", elem_id="shapes-seed")
                        draw = gr.Button("Draw a shapes scene", elem_id="draw-shapes")
                    schedule = gr.Dropdown(demo.forward_schedules, value=demo.forward_schedules[0], label="schedule",
                                           elem_id="schedule")
                    zero_snr = gr.Checkbox(label="zero terminal SNR (Lin et al. 2024)", elem_id="zero-snr",
                                           info="applies to the named schedules; the pipeline's is used as trained")
                    timesteps = gr.Textbox(",".join(map(str, DEFAULT_TIMESTEPS)), label="timesteps", elem_id="timesteps")
                    latent = gr.Checkbox(True, label="also in latent space (this pipeline's VAE, decoded)", elem_id="latent")
                    noise_seed = gr.Number(value=0, precision=0, label="noise seed", elem_id="noise-seed")
                    noise = gr.Button("Noise it", variant="primary", elem_id="noise")
                with gr.Column():
                    strip = gr.Image(label="q(x_t | x_0)", type="pil", format="png", interactive=False, elem_id="forward-strip")
                    gr.Image(demo.schedules_plot(), label="noise schedules", format="png", interactive=False,
                             elem_id="schedule-plot")
            draw.click(_user_errors(demo.shapes), [shapes_seed], [source], api_name="shapes")
            noise.click(_user_errors(demo.forward), [source, schedule, zero_snr, timesteps, latent, noise_seed], [strip],
                        api_name="forward")
        if train is not None:
            build_train_tab(app, train)
    return app


def build_train_app(train: TrainTab):
    """A page with the Train tab only (app.py without a pipeline)."""
    import gradio as gr

    with gr.Blocks(title="ldm: train a denoiser", analytics_enabled=False) as app:
        gr.Markdown("## ldm: train a denoiser\nNo pipeline given: only the Train tab (`python app.py PIPELINE` adds "
                    "Generate and Forward process).")
        build_train_tab(app, train)
    return app


def build_train_tab(app, train: TrainTab) -> None:
    """The Train tab: settings and Start/Stop; a status line, the loss curve and a sample grid that a
    timer refreshes every TRAIN_POLL_S seconds while a training runs (the training itself is a
    background thread, so the page stays responsive); then sampling step by step and the model's
    x_0 at chosen timesteps. Element ids (#train-start, #train-status, ...) are what the browser
    test drives."""
    import gradio as gr

    limits = train.trainer.limits
    defaults = ToySettings()
    with gr.Tab("Train", elem_id="train-tab"):
        gr.Markdown("Train a small denoising U-Net (pixel space, 32 px, no text) in this browser session. One "
                    "training runs at a time on this server; Stop keeps the model, and the samplers below use it.")
        with gr.Row():
            with gr.Column():
                data = gr.Dropdown(train.data_choices, value=SHAPES, label="data", elem_id="train-data")
                schedule = gr.Radio(list(SCHEDULES), value=defaults.schedule, label="noise schedule",
                                    info="beta_t: linear (DDPM), cosine (Nichol & Dhariwal), scaled_linear (SD); "
                                         "flow has none", elem_id="train-schedule")
                objective = gr.Radio(list(OBJECTIVES), value=defaults.objective, label="objective",
                                     info="what the network predicts: the noise, v, or the flow velocity eps - x0",
                                     elem_id="train-objective")
                steps = gr.Slider(10, limits.max_steps, value=min(defaults.steps, limits.max_steps), step=10,
                                  label="steps", elem_id="train-steps")
                lr = gr.Number(value=defaults.lr, label="learning rate", elem_id="train-lr")
                batch = gr.Slider(1, limits.max_batch, value=min(defaults.batch_size, limits.max_batch), step=1,
                                  label="batch size", elem_id="train-batch")
                with gr.Row():
                    seed = gr.Number(value=defaults.seed, precision=0, label="seed", elem_id="train-seed")
                    preview_every = gr.Number(value=defaults.preview_every, precision=0, label="sample grid every N steps",
                                              elem_id="train-preview-every")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="train-start")
                    stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                message = gr.Markdown(elem_id="train-message")
            with gr.Column():
                status = gr.Markdown(elem_id="train-status")
                with gr.Row():
                    loss = gr.Image(label="loss", type="pil", format="png", interactive=False, elem_id="train-loss")
                    preview = gr.Image(label="samples while training (the same noise each time)", type="pil",
                                       format="png", interactive=False, elem_id="train-preview")
        gr.Markdown("### Sample the model step by step")
        with gr.Row():
            with gr.Column(scale=1):
                sampler = gr.Dropdown(train.samplers, value=AUTO_SAMPLER, label="sampler", elem_id="train-sampler",
                                      info="auto: ddim, or flow-euler for a flow model")
                sample_steps = gr.Slider(1, TRAIN_MAX_SAMPLE_STEPS, value=25, step=1, label="sampler steps",
                                         elem_id="train-sample-steps")
                sample_seed = gr.Number(value=0, precision=0, label="seed", elem_id="train-sample-seed")
                sample = gr.Button("Sample", variant="primary", elem_id="train-sample")
            with gr.Column(scale=3):
                trajectory = gr.Image(label="denoising: x_t and predicted x_0 (first image)", type="pil", format="png",
                                      interactive=False, elem_id="train-trajectory")
                samples = gr.Image(label="samples", type="pil", format="png", interactive=False, elem_id="train-samples")
                sample_summary = gr.Markdown(elem_id="train-sample-summary")
        gr.Markdown("### Compare timesteps: a training image noised to t, and what the model recovers")
        with gr.Row():
            with gr.Column(scale=1):
                timesteps = gr.Textbox(",".join(map(str, TRAIN_TIMESTEPS)), label="timesteps", elem_id="train-timesteps")
                image = gr.Number(value=0, precision=0, label="training image", elem_id="train-image")
                compare_seed = gr.Number(value=0, precision=0, label="noise seed", elem_id="train-compare-seed")
                compare = gr.Button("Compare", elem_id="train-compare")
            with gr.Column(scale=3):
                comparison = gr.Image(label="x_0, x_t and predicted x_0", type="pil", format="png", interactive=False,
                                      elem_id="train-comparison")
        timer = gr.Timer(TRAIN_POLL_S, active=False)
        seen = gr.State(None)   # what this page shows now, so an unchanged update is skipped

        def refresh(shown):
            key, line, plot, grid, running = train.poll()
            if key == shown:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=running)
            return key, line, plot, grid, gr.Timer(active=running)

        def on_start(data, schedule, objective, steps, lr, batch, seed, preview_every, request: gr.Request):
            text = train.start(data, schedule, objective, steps, lr, batch, seed, preview_every,
                               owner=request.session_hash if request else None)
            return text, gr.Timer(active=True)   # watch it, or the other visitor's training

        def on_stop(request: gr.Request):
            return train.stop(owner=request.session_hash if request else None)

        # important: Gradio passes the request to a parameter annotated gr.Request, resolving the annotation
        # in the module's globals, where this module (postponed annotations, gradio imported lazily) has none
        for handler in (on_start, on_stop):
            handler.__annotations__["request"] = gr.Request

        polled = [seen, status, loss, preview, timer]
        start.click(_user_errors(on_start), [data, schedule, objective, steps, lr, batch, seed, preview_every],
                    [message, timer], api_name="train_start").then(refresh, [seen], polled, show_progress="hidden")
        stop.click(on_stop, None, [message], api_name="train_stop").then(refresh, [seen], polled, show_progress="hidden")
        timer.tick(refresh, [seen], polled)
        app.load(refresh, [seen], polled)   # a training already running is shown on arrival
        sample.click(_user_errors(train.sample), [sampler, sample_steps, sample_seed], [trajectory, samples, sample_summary],
                     api_name="train_sample")
        compare.click(_user_errors(train.compare), [timesteps, image, compare_seed], [comparison], api_name="train_compare")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Web demo: generate with a pipeline, watch it denoise, explore the forward process.")
    p.add_argument("pipeline", nargs="?", help="run dir, pipeline dir or SD diffusers dir (none: the Train tab only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", help="cuda | mps | cpu (default: auto)")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="most sampler steps per request")
    p.add_argument("--max-size", type=int, help="largest width/height in pixels (default: max(512, native size))")
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="most images per request")
    p.add_argument("--max-queue", type=int, default=Limits.max_queue, help="most requests waiting")
    t = p.add_argument_group("Train tab", "train a toy pixel-space denoiser in the page (ldm.train.toy)")
    t.add_argument("--no-train", action="store_true", help="leave the Train tab out")
    t.add_argument("--train-data", action="append", default=[], metavar="DIR",
                   help="a folder of images the Train tab offers besides shapes, e.g. the output of "
                        "python -m ldm.data.prepare emoji DIR (repeatable; visitors cannot name other folders)")
    t.add_argument("--train-max-steps", type=int, default=ToyLimits.max_steps, help="most training steps per run")
    t.add_argument("--train-max-batch", type=int, default=ToyLimits.max_batch, help="largest training batch")
    return p


def main(argv=None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    from ldm.infer import load_pipeline

    args = build_parser().parse_args(argv)
    if args.pipeline is None and args.no_train:
        raise SystemExit("app: nothing to serve: give a pipeline, or leave out --no-train")
    pipe = load_pipeline(args.pipeline, device=args.device) if args.pipeline else None
    native = pipe.native_size if pipe is not None else 0
    limits = Limits(max_steps=args.max_steps, max_size=args.max_size or max(Limits.max_size, native),
                    max_images=args.max_images, max_queue=args.max_queue)
    try:
        train = None if args.no_train else train_tab(args)
        app = build_app(Demo(pipe, limits), train) if pipe is not None else build_train_app(train)
    except ValueError as err:
        raise SystemExit(f"app: {err}") from err
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        device = pipe.device if pipe is not None else "cpu"
        print(f"warning: listening on {args.host}: anyone who can reach it can use this machine's {device}")
    app.queue(max_size=limits.max_queue, default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, max_file_size=limits.max_upload, ssr_mode=False, show_error=True)


def train_tab(args) -> TrainTab:
    """The Train tab of the command line's limits and folders (each checked now, not on a visitor's click)."""
    for folder in args.train_data:
        problem = data_folder_problem(folder)
        if problem:
            raise ValueError(f"--train-data: {problem}")
    limits = ToyLimits(max_steps=args.train_max_steps, max_batch=args.train_max_batch)
    return TrainTab(ToyTrainer(limits), args.train_data)
