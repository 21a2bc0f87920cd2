"""A web demo on a trained pipeline: text-to-image with its denoising steps, and the forward process.

    python app.py runs/demo/ldm [--port 7860] [--max-steps 50 --max-size 512 --max-images 4]

Gradio, because the demo is a form of model inputs and a gallery of images, which Gradio's
components are; it serves a queue (one generation at a time here), a Python API, and needs no
front-end code of ours. Tab 1 generates through `ldm.infer.generate` (the sampler users run)
and draws the trajectory; tab 2 noises an uploaded image, or a freshly drawn shapes scene,
with the closed-form q(x_t | x_0) in pixel and latent space (`ldm.viz`).

Safety: it listens on 127.0.0.1 unless told otherwise, and one request cannot exhaust the
machine: steps, image side and images per request are bounded (`Limits`, set on the command
line) and checked on the server, since an API client does not go through the page's sliders;
requests beyond a bound are refused with a message that names it. Generations run one at a
time from a bounded queue, and uploads are capped in size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from PIL import Image

from ldm.diffusion import make_train_scheduler, objective_of
from ldm.sampling import SCHEDULERS, make_scheduler
from ldm.viz import (BETA_SCHEDULES, DEFAULT_TIMESTEPS, figure_to_image, forward_figure, forward_rows, noise_config,
                     parse_timesteps, reverse_figure, reverse_process, schedule_curves, schedule_label,
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
        summary = f"{num_images} image(s), {width}x{height}, {scheduler}, {steps} steps, guidance {guidance_scale}: {seconds:.1f} s"
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


def build_app(demo: Demo):
    """The Gradio Blocks page; element ids (#prompt, #generate, #images, ...) are what the
    browser test drives."""
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
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Web demo: generate with a pipeline, watch it denoise, explore the forward process.")
    p.add_argument("pipeline", help="run dir, pipeline dir or SD diffusers dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", help="cuda | mps | cpu (default: auto)")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="most sampler steps per request")
    p.add_argument("--max-size", type=int, help="largest width/height in pixels (default: max(512, native size))")
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="most images per request")
    p.add_argument("--max-queue", type=int, default=Limits.max_queue, help="most requests waiting")
    return p


def main(argv=None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    from ldm.infer import load_pipeline

    args = build_parser().parse_args(argv)
    pipe = load_pipeline(args.pipeline, device=args.device)
    limits = Limits(max_steps=args.max_steps, max_size=args.max_size or max(Limits.max_size, pipe.native_size),
                    max_images=args.max_images, max_queue=args.max_queue)
    try:
        app = build_app(Demo(pipe, limits))
    except ValueError as err:
        raise SystemExit(f"app: {err}") from err
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can use this machine's {pipe.device}")
    app.queue(max_size=limits.max_queue, default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, max_file_size=limits.max_upload, ssr_mode=False, show_error=True)
