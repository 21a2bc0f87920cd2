"""Diffusion made visible: forward-process strips, noise schedules, reverse trajectories, training curves.

    python viz.py forward --shapes-seed 3 --vae runs/demo/vae/vae --out docs/images/forward.png
    python viz.py schedules --out docs/images/schedules.png
    python viz.py reverse runs/demo/ldm --prompt "a large red circle on the left, on a gray background"
    python viz.py curves runs/demo/vae/metrics.jsonl runs/demo/ldm/metrics.jsonl --out curves.png

Every schedule here is a diffusers DDPMScheduler built from `ldm.diffusion.NoiseConfig` (or a
pipeline's saved training schedule), so what is drawn is the schedule training uses, zero
terminal SNR included. The forward process is the scheduler's own `add_noise`, the closed form
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4); the reverse process
is `ldm.infer.generate(trajectory_every=N)`, the sampler users run.

Figures are plain `matplotlib.figure.Figure`s, never pyplot: saving one to PNG renders through
the Agg canvas, so nothing needs a display and no global backend state is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from ldm.diffusion import NoiseConfig, make_train_scheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DEFAULT_TIMESTEPS = (0, 50, 100, 250, 500, 750, 999)
METRICS_IGNORED = ("step", "time", "skipped")  # bookkeeping, not curves
IGNORED_SUFFIXES = ("/n", "/candidates")       # the size of an evaluation, not a curve
INTERVAL_SUFFIXES = ("_lo", "_hi")              # a bootstrap interval: a band around its figure
REFERENCE_SUFFIXES = ("_floor", "_ceiling", "_chance")  # what to read a figure against: a dashed line beside it
MAX_CURVE_PANELS = 18  # a VAE with its discriminator and rFID logs 16 figures


# ----------------------------------------------------------------------------- schedules


def noise_config(beta_schedule: str = "scaled_linear", zero_terminal_snr: bool = False, **overrides) -> NoiseConfig:
    """A valid training NoiseConfig for a schedule: zero terminal SNR brings the v-prediction and
    trailing spacing it requires (Lin et al. 2024), so the betas are those training would use."""
    zero = dict(prediction_type="v_prediction", timestep_spacing="trailing") if zero_terminal_snr else {}
    cfg = NoiseConfig(beta_schedule=beta_schedule, zero_terminal_snr=zero_terminal_snr, **{**zero, **overrides})
    cfg.validate()
    return cfg


def schedule_label(cfg: NoiseConfig) -> str:
    name = "cosine" if cfg.beta_schedule == "squaredcos_cap_v2" else cfg.beta_schedule
    return name + (" + zero SNR" if cfg.zero_terminal_snr else "")


@dataclasses.dataclass
class ScheduleCurves:
    """Per-timestep values of one schedule, indexed by t = 0 .. T-1."""

    label: str
    beta: np.ndarray
    alpha_bar: np.ndarray
    log_snr: np.ndarray   # log(abar / (1 - abar)); -inf where abar = 0 (zero terminal SNR at t = T-1)


def schedule_curves(scheduler: DDPMScheduler, label: str) -> ScheduleCurves:
    """beta_t, alpha_bar_t = prod_{s<=t} (1 - beta_s) and log-SNR_t, as the scheduler computed them."""
    alpha_bar = scheduler.alphas_cumprod.double().numpy()
    with np.errstate(divide="ignore"):
        log_snr = np.log(alpha_bar) - np.log1p(-alpha_bar)
    return ScheduleCurves(label, scheduler.betas.double().numpy(), alpha_bar, log_snr)


def standard_schedules(num_train_timesteps: int = 1000) -> list[ScheduleCurves]:
    """linear, scaled_linear and cosine, each with and without zero terminal SNR."""
    return [
        schedule_curves(make_train_scheduler(cfg), schedule_label(cfg))
        for name in BETA_SCHEDULES
        for zero in (False, True)
        for cfg in [noise_config(name, zero, num_train_timesteps=num_train_timesteps)]
    ]


def schedules_figure(curves: list[ScheduleCurves]) -> Figure:
    """beta_t (log scale), alpha_bar_t and log-SNR_t over t, one colour per beta schedule and a
    dashed line for its zero-terminal-SNR rescaling."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    colours = {}
    for c in curves:
        base = c.label.split(" + ")[0]
        colours.setdefault(base, f"C{len(colours)}")
        style = dict(color=colours[base], linestyle="--" if "zero SNR" in c.label else "-", label=c.label, linewidth=1.5)
        t = np.arange(len(c.beta))
        axes[0].plot(t, c.beta, **style)
        axes[1].plot(t, c.alpha_bar, **style)
        # -inf (abar_T = 0) cannot be drawn; the dashed line simply ends one step early
        axes[2].plot(t, np.where(np.isfinite(c.log_snr), c.log_snr, np.nan), **style)
    axes[0].set_yscale("log")
    for ax, title in zip(axes, (r"$\beta_t$", r"$\bar\alpha_t$", r"log-SNR$_t = \log\,\bar\alpha_t/(1-\bar\alpha_t)$")):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- forward process


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> (1, 3, H, W) in [-1, 1], the range the VAE and the pixel-space process use."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def forward_noising(scheduler: DDPMScheduler, x0: torch.Tensor, timesteps, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for each t (Ho et al. 2020, eq. 4).

    One eps is drawn and shared by every t, so the columns of a strip differ only in how much of
    it they hold. `x0` is (1, C, H, W); the result is (len(timesteps), C, H, W).
    """
    t = torch.as_tensor(list(timesteps), dtype=torch.long)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    n = len(t)
    return scheduler.add_noise(x0.expand(n, -1, -1, -1), eps.expand(n, -1, -1, -1), t)


@torch.no_grad()
def latent_forward_noising(vae, scheduler: DDPMScheduler, image: Image.Image, timesteps,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """The forward process where latent diffusion runs it: encode, noise the scaled latents with
    the same closed form, decode back. Returns (len(timesteps), 3, H, W) in [0, 1]."""
    from ldm.sampling import decode_latents, encode_images

    x = (to_tensor(image) + 1) / 2
    z0 = encode_images(vae, x.to(vae.device), generator=generator).float().cpu()
    z_t = forward_noising(scheduler, z0, timesteps, generator)
    return decode_latents(vae, z_t.to(vae.device)).cpu()


def _column_title(scheduler: DDPMScheduler, t: int) -> str:
    if not hasattr(scheduler, "alphas_cumprod"):  # rectified flow: x_t = (1 - sigma) x_0 + sigma eps, sigma = t / T
        sigma = t / scheduler.config.num_train_timesteps
        log_snr = 2 * math.log((1 - sigma) / sigma) if 0 < sigma < 1 else (math.inf if sigma == 0 else -math.inf)
        return f"t={t}\n" + r"$\sigma$" + f"={sigma:.3f}\nlogSNR={log_snr:.1f}"
    abar = float(scheduler.alphas_cumprod[t])
    log_snr = math.log(abar / (1 - abar)) if abar > 0 else -math.inf
    return f"t={t}\n" + r"$\bar\alpha$" + f"={abar:.3f}\nlogSNR={log_snr:.1f}"


def forward_figure(rows: dict[str, torch.Tensor], scheduler: DDPMScheduler, timesteps, title: str = "") -> Figure:
    """A strip per row (label -> (n, 3, H, W) in [0, 1]), one column per timestep, labelled
    with t, alpha_bar_t and log-SNR_t."""
    timesteps = list(timesteps)
    fig = Figure(figsize=(1.4 * len(timesteps) + 0.8, 1.55 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), len(timesteps), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, t in enumerate(timesteps):
            ax = axes[r, c]
            ax.imshow(images[c].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_column_title(scheduler, t), fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def forward_rows(image: Image.Image, scheduler: DDPMScheduler, timesteps, vae=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The strips to draw: pixel space always, latent space (decoded) when a VAE is given."""
    pixels = forward_noising(scheduler, to_tensor(image), timesteps, torch.Generator().manual_seed(seed))
    rows = {"pixel space": ((pixels + 1) / 2).clamp(0, 1)}   # noised pixels leave [-1, 1]; shown clipped
    if vae is not None:
        rows["latent space\n(decoded)"] = latent_forward_noising(vae, scheduler, image, timesteps, torch.Generator().manual_seed(seed))
    return rows


def shapes_image(seed: int, resolution: int = 64, num_objects: int = 1) -> Image.Image:
    """A scene of the synthetic shapes dataset, the data the demo models train on."""
    from ldm.data.shapes import render, sample_scene

    return render(sample_scene(np.random.default_rng(seed), num_objects), resolution)


def load_vae(path: str | Path, device: str = "cpu"):
    """An AutoencoderKL from a VAE dir, a pipeline dir, a run dir holding either, or a single file."""
    from ldm.models.vae import load_vae as read_vae
    from ldm.single_file import model_dir

    path = model_dir(path)
    if (path / "pipeline" / "vae" / "config.json").is_file():  # a stage-3 run dir
        path = path / "pipeline"
    return read_vae(path).to(device).eval()


# ----------------------------------------------------------------------------- reverse process


def reverse_process(pipe, prompt: str, *, seed: int = 0, steps: int = 25, frames: int = 8, **generate_kwargs) -> dict:
    """One image with its trajectory, about `frames` snapshots of (t, x_t, predicted x_0),
    through the same `ldm.infer.generate` users sample with."""
    from ldm.infer import generate

    every = max(1, math.ceil(steps / frames))
    return generate(pipe, [prompt], seeds=[seed], steps=steps, trajectory_every=every, **generate_kwargs)[0]


def reverse_figure(result: dict) -> Figure:
    """Two rows over the recorded steps: the sample x after the step from t, and the model's
    prediction of x_0 at t; the last column is the final image."""
    trajectory = result["trajectory"]
    columns = [(f"t={t}", xt, x0) for t, xt, x0 in trajectory] + [("final", result["image"], result["image"])]
    fig = Figure(figsize=(1.3 * len(columns) + 0.8, 3.4), layout="constrained")
    axes = fig.subplots(2, len(columns), squeeze=False)
    for c, (title, xt, x0) in enumerate(columns):
        for r, image in enumerate((xt, x0)):
            axes[r, c].imshow(image, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[0, c].set_title(title, fontsize=8)
    axes[0, 0].set_ylabel(r"$x_t$", fontsize=9)
    axes[1, 0].set_ylabel(r"predicted $x_0$", fontsize=9)
    fig.suptitle(f"{result['prompt']!r}  ({result['scheduler']}, {result['steps']} steps, seed {result['seed']})", fontsize=9)
    return fig


def reverse_frames(result: dict, side: int = 128) -> list[Image.Image]:
    """GIF frames: x_t beside predicted x_0, enlarged without smoothing, the timestep written under."""
    pairs = [(f"t={t}", xt, x0) for t, xt, x0 in result["trajectory"]] + [("final", result["image"], result["image"])]
    frames = []
    for label, xt, x0 in pairs:
        frame = Image.new("RGB", (2 * side + 6, side + 16), (255, 255, 255))
        frame.paste(xt.resize((side, side), Image.NEAREST), (2, 2))
        frame.paste(x0.resize((side, side), Image.NEAREST), (side + 4, 2))
        ImageDraw.Draw(frame).text((4, side + 3), f"{label}   x_t | predicted x_0", fill=(0, 0, 0))
        frames.append(frame)
    return frames


def save_gif(frames: list[Image.Image], path: str | Path, duration_ms: int = 250, hold_last_ms: int = 1500) -> None:
    """An endlessly looping GIF that lingers on the last frame, so the result can be seen."""
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True)


# ----------------------------------------------------------------------------- training curves


def read_metrics(path: str | Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl and how many lines were skipped as unreadable (a run
    killed mid-write leaves a torn last line; it is counted, not fatal)."""
    records, skipped = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key over the records that log it (losses, evals and LR are
    written on different lines)."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def metric_panels(records: list[dict], keys: list[str] | None = None) -> dict[str, list[str]]:
    """Panel title -> keys drawn in it: every key holding "loss" shares one panel so train and
    validation losses read against each other; every other key gets its own. The run's
    one-off `final/*` summary values are left out unless asked for."""
    logged = numeric_keys(records)
    if keys is None:
        keys = [k for k in logged if k not in METRICS_IGNORED and not k.startswith("final/") and not k.endswith(IGNORED_SUFFIXES)]
    else:
        keys = [k for k in keys if k in logged]
    panels: dict[str, list[str]] = {}
    for key in keys:
        panels.setdefault(figure_of(key, logged) or ("loss" if "loss" in key else key), []).append(key)
    return panels


def figure_of(key: str, logged: list[str]) -> str | None:
    """The logged figure a key is drawn beside (quality/fid_lo, quality/fid_floor and quality/fid_floor_lo
    -> quality/fid), or None for a figure of its own."""
    base = key
    for suffixes in (INTERVAL_SUFFIXES, REFERENCE_SUFFIXES):
        base = next((base[: -len(s)] for s in suffixes if base.endswith(s)), base)
    return base if base != key and base in logged else None


def numeric_keys(records: list[dict]) -> list[str]:
    """Keys with a number on some line, in first-seen order."""
    return list(dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """A centred moving average of as many points as an exponential moving average of this
    weight averages ((1 + weight) / (1 - weight): 19 at 0.9, TensorBoard's slider scale).

    TensorBoard's one-sided average lags by half that: on a loss that falls fast the smoothed
    curve runs above every point it smooths, and its last point is an old value. A centred window
    has no lag; near the ends, where it does not fit, a straight line fitted through the points
    that are there takes its place, so a trend is followed to the last point.
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    half = min(int((1 + weight) / (2 * (1 - weight)) + 1e-9), (n - 1) // 2) if 0 < weight < 1 else 0
    if half < 1:
        return values.copy()
    sums = np.concatenate([[0.0], np.cumsum(values)])
    middle = np.arange(half, n - half)
    out = np.empty(n)
    out[half : n - half] = (sums[middle + half + 1] - sums[middle - half]) / (2 * half + 1)
    x = np.arange(n)
    for i in [*range(half), *range(n - half, n)]:
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out[i] = np.polyfit(x[lo:hi] - i, values[lo:hi], 1)[1]  # the line's value at point i
    return out


def curves_figure(runs: dict[str, list[dict]], keys: list[str] | None = None, smoothing: float = 0.9) -> Figure:
    """Training curves of one or more runs (label -> records), one panel per metric group.

    Train-time series are drawn faint as logged and solid smoothed (without lag, see `smooth`);
    sparse series (evaluations) as markers. Positive losses use a log axis, where their late, slow decrease is visible.
    """
    if keys is not None:
        missing = [k for k in keys if not any(k in numeric_keys(records) for records in runs.values())]
        if missing:
            available = list(dict.fromkeys(k for records in runs.values() for k in numeric_keys(records)))
            raise ValueError(f"no run logs {missing}; the runs log {available}")
    panels: dict[str, list[str]] = {}
    for records in runs.values():
        for title, panel_keys in metric_panels(records, keys).items():
            panels.setdefault(title, [])
            panels[title] += [k for k in panel_keys if k not in panels[title]]
    if not panels:
        raise ValueError("no numeric metrics to plot" + (f" among keys {keys}" if keys else ""))
    if len(panels) > MAX_CURVE_PANELS:
        raise ValueError(f"{len(panels)} metric panels ({', '.join(panels)}); choose at most {MAX_CURVE_PANELS} with --keys")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (title, panel_keys) in zip(axes, panels.items()):
        positive = True
        for r, (run, records) in enumerate(runs.items()):
            for k, key in enumerate(panel_keys):
                steps, values = series(records, key)
                if not len(steps) or key.endswith(INTERVAL_SUFFIXES) and key[:-3] in panel_keys:
                    continue  # an interval is drawn as its figure's band
                if key.endswith(REFERENCE_SUFFIXES):  # the floor, ceiling or chance of the panel's figure
                    name = key.rpartition("_")[2]
                    ax.axhline(values[-1], color=f"C{r}", linestyle=":" if name == "chance" else "--", linewidth=1,
                               label=name if len(runs) == 1 else f"{run}: {name}")
                    continue
                positive &= bool(np.all(values[np.isfinite(values)] > 0))
                # a learning rate is a schedule, not a noisy measurement: smoothing would only make it lag
                weight = 0.0 if key.startswith("lr") else smoothing
                _draw_series(ax, steps, values, weight, color=f"C{r * len(panel_keys) + k}",
                             label=key if len(runs) == 1 else f"{run}: {key}")
                (lo_steps, lo), (_, hi) = series(records, f"{key}_lo"), series(records, f"{key}_hi")
                if len(lo) and len(lo) == len(hi):  # the bootstrap 95% interval
                    ax.fill_between(lo_steps, lo, hi, color=f"C{r * len(panel_keys) + k}", alpha=0.2, linewidth=0)
        if title == "loss" and positive:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def _draw_series(ax, steps: np.ndarray, values: np.ndarray, smoothing: float, color: str, label: str) -> None:
    finite = np.isfinite(values)
    steps, values = steps[finite], values[finite]   # a NaN loss was skipped by the loop, not learned from
    if len(steps) < 20 or not smoothing:
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, color=color, label=label)
        return
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    # a positive series (a loss) is smoothed in log space, as a log axis shows it: one spike then
    # lifts the curve by its factor, not by its height
    log = bool(np.all(values > 0))
    smoothed = np.exp(smooth(np.log(values), smoothing)) if log else smooth(values, smoothing)
    ax.plot(steps, smoothed, color=color, label=label)


# ----------------------------------------------------------------------------- output


def figure_to_image(fig: Figure, dpi: int = 100) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ----------------------------------------------------------------------------- CLI


def parse_timesteps(text: str, num_train_timesteps: int, max_count: int = 16) -> list[int]:
    """"0,250,999" -> [0, 250, 999], each in [0, T-1], at most `max_count` of them."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"timesteps must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError("give at least one timestep")
    if len(values) > max_count:
        raise ValueError(f"at most {max_count} timesteps, got {len(values)}")
    bad = [v for v in values if not 0 <= v < num_train_timesteps]
    if bad:
        raise ValueError(f"timesteps must be in [0, {num_train_timesteps - 1}], got {bad}")
    return values


def _forward_command(args) -> list[Path]:
    cfg = noise_config(args.schedule, args.zero_snr, num_train_timesteps=args.num_train_timesteps)
    scheduler = make_train_scheduler(cfg)
    timesteps = parse_timesteps(args.timesteps, cfg.num_train_timesteps)
    if args.image:
        image = Image.open(args.image).convert("RGB").resize((args.resolution, args.resolution), Image.LANCZOS)
    else:
        image = shapes_image(args.shapes_seed, args.resolution)
    vae = load_vae(args.vae) if args.vae else None
    rows = forward_rows(image, scheduler, timesteps, vae=vae, seed=args.seed)
    title = r"forward process $q(x_t|x_0)=\mathcal{N}(\sqrt{\bar\alpha_t}\,x_0,\,(1-\bar\alpha_t)I)$, " + schedule_label(cfg)
    return [save_figure(forward_figure(rows, scheduler, timesteps, title), args.out)]


def _schedules_command(args) -> list[Path]:
    return [save_figure(schedules_figure(standard_schedules(args.num_train_timesteps)), args.out)]


def _reverse_command(args) -> list[Path]:
    from ldm.infer import load_pipeline

    pipe = load_pipeline(args.pipeline, device=args.device, dtype="float32")
    size = args.size or None
    result = reverse_process(pipe, args.prompt, seed=args.seed, steps=args.steps, frames=args.frames,
                             scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                             negative_prompts=[args.negative_prompt], width=size, height=size)
    out = Path(args.out)
    written = [save_figure(reverse_figure(result), out)]
    gif = Path(args.gif) if args.gif else out.with_suffix(".gif")
    save_gif(reverse_frames(result, args.gif_side), gif)
    return written + [gif]


def _curves_command(args) -> list[Path]:
    runs = {}
    for path in args.metrics:
        records, skipped = read_metrics(path)
        if skipped:
            warnings.warn(f"{path}: skipped {skipped} unreadable line(s)")
        label = Path(path).parent.name or str(path)
        runs[label if label not in runs else str(path)] = records
    keys = args.keys.split(",") if args.keys else None
    return [save_figure(curves_figure(runs, keys, args.smoothing), args.out)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Diffusion made visible: forward process, schedules, reverse process, training curves.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("forward", help="strip of q(x_t | x_0) at chosen timesteps, in pixel and (with --vae) latent space")
    source = f.add_mutually_exclusive_group()
    source.add_argument("--image", help="an image file (resized to --resolution square)")
    source.add_argument("--shapes-seed", type=int, default=0, help="draw a shapes-dataset scene with this seed (default)")
    f.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    f.add_argument("--timesteps", default=",".join(map(str, DEFAULT_TIMESTEPS)), help="comma-separated t in [0, T-1]")
    f.add_argument("--schedule", choices=BETA_SCHEDULES, default="scaled_linear")
    f.add_argument("--zero-snr", action="store_true", help="rescale betas to zero terminal SNR (Lin et al. 2024)")
    f.add_argument("--num-train-timesteps", type=int, default=1000)
    f.add_argument("--vae", help="VAE / pipeline / run dir: also noise in its latent space and decode back")
    f.add_argument("--seed", type=int, default=0, help="seed of the noise eps")
    f.add_argument("--out", default="forward.png")
    f.set_defaults(run=_forward_command)

    s = sub.add_parser("schedules", help="beta_t, alpha_bar_t and log-SNR for linear, scaled_linear, cosine, +/- zero terminal SNR")
    s.add_argument("--num-train-timesteps", type=int, default=1000)
    s.add_argument("--out", default="schedules.png")
    s.set_defaults(run=_schedules_command)

    r = sub.add_parser("reverse", help="x_t and predicted x_0 along the sampler's steps: a strip and a GIF")
    r.add_argument("pipeline", help="run dir, pipeline dir or SD diffusers dir")
    r.add_argument("--prompt", required=True)
    r.add_argument("--negative-prompt", default="")
    r.add_argument("--scheduler", help="sampler short name (python infer.py --list-schedulers); default: the pipeline's")
    r.add_argument("--steps", type=int, default=25)
    r.add_argument("--frames", type=int, default=8, help="about this many trajectory snapshots")
    r.add_argument("--guidance-scale", type=float, default=7.5)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--size", type=int, default=0, help="image side in pixels (default: the pipeline's native size)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--gif-side", type=int, default=128, help="side of each image in a GIF frame, pixels")
    r.add_argument("--out", default="reverse.png", help="the strip; the GIF goes beside it (.gif) unless --gif")
    r.add_argument("--gif")
    r.set_defaults(run=_reverse_command)

    c = sub.add_parser("curves", help="training curves from one or more metrics.jsonl files")
    c.add_argument("metrics", nargs="+", help="metrics.jsonl files (several: overlaid, labelled by run dir)")
    c.add_argument("--keys", help="comma-separated keys to plot (default: all but step/time/skipped/final/*)")
    c.add_argument("--smoothing", type=float, default=0.9,
                   help="dense series: a centred window of as many points as an EMA of this weight averages (0.9: 19); 0 disables")
    c.add_argument("--out", default="curves.png")
    c.set_defaults(run=_curves_command)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        written = args.run(args)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"viz {args.command}: {err}") from err
    for path in written:
        print(f"wrote {path}")
