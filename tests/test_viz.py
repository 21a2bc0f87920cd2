"""ldm.viz: the forward process is the closed form, schedules are the training ones, the reverse
strip and GIF follow the sampler's trajectory, training curves survive real metrics files.

Tiny random models, CPU, no network.
"""

import json
import math

import numpy as np
import pytest
import torch
from conftest_app import TINY_SIZE, tiny_pipeline_dir  # noqa: F401  (fixture)
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image

from ldm.diffusion import make_train_scheduler
from ldm.infer import load_pipeline
from ldm.models.presets import vae_config
from ldm.viz import (BETA_SCHEDULES, curves_figure, forward_figure, forward_noising, forward_rows, main, metric_panels,
                     noise_config, parse_timesteps, read_metrics, reverse_figure, reverse_frames, reverse_process,
                     save_gif, schedule_curves, schedules_figure, shapes_image, smooth, standard_schedules)


# ----------------------------------------------------------------------------- forward process


def test_forward_noising_is_the_closed_form():
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, one eps shared by all t (Ho et al. 2020, eq. 4)."""
    scheduler = make_train_scheduler(noise_config("scaled_linear"))
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    timesteps = [0, 10, 500, 999]
    xt = forward_noising(scheduler, x0, timesteps, torch.Generator().manual_seed(7))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    for row, t in zip(xt, timesteps):
        abar = scheduler.alphas_cumprod[t]
        torch.testing.assert_close(row, (abar.sqrt() * x0 + (1 - abar).sqrt() * eps)[0])
    assert (xt[0] - x0[0]).abs().max() < 0.1       # t = 0 is nearly the image
    assert abs(xt[-1].std().item() - 1) < 0.3       # t = T-1 is nearly unit noise


def test_zero_terminal_snr_leaves_no_trace_of_the_image():
    """With zero terminal SNR (Lin et al. 2024), x_T is pure noise: any two images give the same x_T."""
    scheduler = make_train_scheduler(noise_config("scaled_linear", zero_terminal_snr=True))
    a, b = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    xa = forward_noising(scheduler, a, [500, 999], torch.Generator().manual_seed(0))
    xb = forward_noising(scheduler, b, [500, 999], torch.Generator().manual_seed(0))
    assert torch.equal(xa[1], xb[1])
    assert not torch.allclose(xa[0], xb[0])


def test_forward_rows_in_pixel_and_latent_space():
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config("tiny-f4")).eval()
    scheduler = make_train_scheduler(noise_config())
    image = shapes_image(seed=3, resolution=16)
    rows = forward_rows(image, scheduler, [0, 250, 999], vae=vae, seed=1)
    assert list(rows) == ["pixel space", "latent space\n(decoded)"]
    for images in rows.values():
        assert images.shape == (3, 3, 16, 16)
        assert images.min() >= 0 and images.max() <= 1
    # at t = 0 the pixel row is the image itself (to within sqrt(1 - abar_0) of noise)
    original = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    assert (rows["pixel space"][0] - original).abs().mean() < 0.05
    fig = forward_figure(rows, scheduler, [0, 250, 999])
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[0].startswith("t=0") and titles[2].startswith("t=999")
    assert len(fig.axes) == 6


def test_parse_timesteps_rejects_out_of_range():
    assert parse_timesteps("0, 250,999", 1000) == [0, 250, 999]
    for bad, message in (("1000", r"\[0, 999\]"), ("a,b", "integers"), ("", "at least one"), (",".join(["1"] * 17), "at most")):
        with pytest.raises(ValueError, match=message):
            parse_timesteps(bad, 1000)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("zero", [False, True])
def test_schedule_curves_are_the_training_schedule(name, zero):
    """The betas are diffusers' DDPMScheduler's, zero-SNR rescaling included, as training builds them."""
    curves = schedule_curves(make_train_scheduler(noise_config(name, zero)), "x")
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=name,
                              rescale_betas_zero_snr=zero)
    np.testing.assert_allclose(curves.beta, reference.betas.double().numpy(), rtol=1e-6)
    assert np.all(np.diff(curves.alpha_bar) < 0)
    t = 300
    assert curves.log_snr[t] == pytest.approx(math.log(curves.alpha_bar[t] / (1 - curves.alpha_bar[t])))
    if zero:
        assert curves.alpha_bar[-1] == 0 and curves.log_snr[-1] == -np.inf
        assert np.all(np.isfinite(curves.log_snr[:-1]))
    else:
        assert curves.alpha_bar[-1] > 0 and np.all(np.isfinite(curves.log_snr))


def test_zero_snr_config_is_a_valid_training_config():
    cfg = noise_config("squaredcos_cap_v2", zero_terminal_snr=True)
    assert (cfg.prediction_type, cfg.timestep_spacing) == ("v_prediction", "trailing")


def test_schedules_figure_draws_every_schedule():
    curves = standard_schedules()
    assert len(curves) == 6 and len({c.label for c in curves}) == 6
    fig = schedules_figure(curves)
    assert len(fig.axes) == 3
    assert all(len(ax.get_lines()) == 6 for ax in fig.axes)
    assert fig.axes[0].get_yscale() == "log"


# ----------------------------------------------------------------------------- reverse process


def test_reverse_strip_and_gif_follow_the_trajectory(tiny_pipeline_dir, tmp_path):
    pipe = load_pipeline(tiny_pipeline_dir, device="cpu", dtype="float32")
    result = reverse_process(pipe, "a large red circle on the left", seed=0, steps=6, frames=3, scheduler="ddim")
    steps = [t for t, _, _ in result["trajectory"]]
    assert len(steps) == 3 and steps == sorted(steps, reverse=True)   # every 2nd of 6 steps, noisy to clean
    fig = reverse_figure(result)
    assert len(fig.axes) == 2 * 4                                      # x_t and x0 rows; 3 steps + final
    assert fig.axes[0].get_title() == f"t={steps[0]}" and fig.axes[3].get_title() == "final"
    frames = reverse_frames(result, side=64)
    assert len(frames) == 4 and frames[0].size == (2 * 64 + 6, 64 + 16)
    # the last frame shows the final image, enlarged, on its left
    final = np.asarray(result["image"].resize((64, 64), Image.NEAREST))
    np.testing.assert_array_equal(np.asarray(frames[-1])[2:66, 2:66], final)
    save_gif(frames, tmp_path / "r.gif", duration_ms=100, hold_last_ms=900)
    with Image.open(tmp_path / "r.gif") as gif:
        assert gif.n_frames == 4 and gif.info["loop"] == 0
        gif.seek(3)
        assert gif.info["duration"] == 900


# ----------------------------------------------------------------------------- training curves


def _write_metrics(path, n=60, nan_at=None):
    with path.open("w") as f:
        for step in range(1, n + 1):
            loss = float("nan") if step == nan_at else 1.0 / step
            f.write(json.dumps({"step": step, "time": step * 0.1, "loss": loss, "lr": 1e-3, "skipped": 0}) + "\n")
            if step % 20 == 0:
                f.write(json.dumps({"step": step, "time": step * 0.1, "val_loss": 1.2 / step, "eval/psnr": 20 + step / 10}) + "\n")
        f.write(json.dumps({"step": n, "time": 9.9, "final/psnr": 30.0}) + "\n")
        f.write('{"step": 61, "loss": 0.0')   # a run killed mid-write


def test_read_metrics_counts_unreadable_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path)
    with path.open("a") as f:
        f.write("\n[1, 2]\n")
    records, skipped = read_metrics(path)
    assert len(records) == 60 + 3 + 1 and skipped == 2


def test_metric_panels_group_losses_and_drop_bookkeeping(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path)
    records, _ = read_metrics(path)
    assert metric_panels(records) == {"loss": ["loss", "val_loss"], "lr": ["lr"], "eval/psnr": ["eval/psnr"]}
    assert metric_panels(records, ["final/psnr"]) == {"final/psnr": ["final/psnr"]}


def test_every_figure_a_gan_vae_logs_draws_without_choosing_keys():
    train = ["lr", "disc_lr", "rec", "nll", "kl", "logvar", "g_loss", "d_weight", "d_loss", "logits_real",
             "logits_fake", "grad_norm"]
    evals = ["eval/psnr", "eval/ssim", "eval/mse", "eval/rfid", "eval/rkid"]
    records = [{"step": s, **{k: 1.0 / s for k in train}} for s in (1, 2, 3)] + [{"step": 3, **{k: 0.5 for k in evals}}]
    fig = curves_figure({"vae": records})
    assert len([ax for ax in fig.axes if ax.has_data()]) == len(metric_panels(records)) == 16


def test_smooth_is_centred_and_follows_a_trend_to_the_ends():
    np.testing.assert_allclose(smooth(np.full(10, 3.0), 0.9), 3.0)   # no pull towards 0 at either end
    stepped = smooth(np.r_[np.zeros(50), np.ones(200)], 0.9)
    assert stepped[0] == pytest.approx(0, abs=1e-9) and stepped[-1] == pytest.approx(1, abs=1e-9)
    assert stepped[49] < 0.5 < stepped[50]  # the step stays where it is: centred, not 9 points late
    assert stepped[40] == 0 and stepped[59] == 1 and stepped[41] > 0  # 19 points: 9 either side at weight 0.9
    # a loss decaying as the demo's does, logged 70 times, smoothed as the curves smooth it (in log space)
    falling = np.exp(-np.linspace(0, 5, 70))
    np.testing.assert_allclose(np.exp(smooth(np.log(falling), 0.9)), falling, rtol=1e-9)  # to the last point
    noisy = np.log(falling) + np.random.default_rng(0).normal(0, 0.3, 70)
    assert np.std(smooth(noisy, 0.9) - np.log(falling)) < 0.5 * np.std(noisy - np.log(falling))
    assert np.array_equal(smooth(noisy, 0.0), noisy)


def test_curves_figure_overlays_runs_and_ignores_nan(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_metrics(tmp_path / "a" / "metrics.jsonl", nan_at=30)
    _write_metrics(tmp_path / "b" / "metrics.jsonl", n=40)
    runs = {name: read_metrics(tmp_path / name / "metrics.jsonl")[0] for name in ("a", "b")}
    fig = curves_figure(runs)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loss", "lr", "eval/psnr"]
    loss_ax = visible[0]
    assert loss_ax.get_yscale() == "log"
    for line in loss_ax.get_lines():
        assert np.all(np.isfinite(line.get_ydata()))
    assert len(loss_ax.get_lines()) == 2 * 2 + 2          # per run: raw + smoothed loss, val_loss as markers
    lr_lines = visible[1].get_lines()
    assert len(lr_lines) == 2 and all(np.all(line.get_ydata() == 1e-3) for line in lr_lines)   # never smoothed
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert labels == ["a: loss", "a: val_loss", "b: loss", "b: val_loss"]
    with pytest.raises(ValueError, match=r"no run logs \['nope'\]; the runs log \['step', 'time', 'loss'"):
        curves_figure(runs, keys=["loss", "nope"])


# ----------------------------------------------------------------------------- CLI


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_every_figure(tiny_pipeline_dir, tmp_path, capsys):
    main(["forward", "--shapes-seed", "2", "--resolution", "32", "--timesteps", "0,500,999", "--zero-snr",
          "--vae", str(tiny_pipeline_dir), "--out", str(tmp_path / "forward.png")])
    main(["schedules", "--out", str(tmp_path / "schedules.png")])
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    _write_metrics(metrics)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        main(["curves", str(metrics), "--out", str(tmp_path / "curves.png")])
    main(["reverse", str(tiny_pipeline_dir), "--prompt", "a small blue star", "--steps", "4", "--frames", "2",
          "--gif-side", "48", "--out", str(tmp_path / "reverse.png")])
    for name in ("forward", "schedules", "curves", "reverse"):
        assert _is_png(tmp_path / f"{name}.png"), name
    with Image.open(tmp_path / "reverse.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (2 * 48 + 6, 48 + 16)
    printed = capsys.readouterr().out
    assert printed.count("wrote ") == 5


def test_cli_reports_bad_input(tmp_path):
    with pytest.raises(SystemExit, match=r"viz forward: timesteps must be in \[0, 999\]"):
        main(["forward", "--timesteps", "0,1000", "--out", str(tmp_path / "f.png")])
    with pytest.raises(SystemExit, match="no AutoencoderKL"):
        main(["forward", "--vae", str(tmp_path), "--out", str(tmp_path / "f.png")])
    assert not (tmp_path / "f.png").exists()


def test_tiny_pipeline_is_tiny(tiny_pipeline_dir):
    """The fixture the app tests rely on: native size TINY_SIZE, so a generation takes a second."""
    assert load_pipeline(tiny_pipeline_dir, device="cpu").native_size == TINY_SIZE


def test_quality_figures_share_a_panel_with_their_interval_floor_and_ceiling():
    records = []
    for step in (100, 200, 300):
        records.append({"step": step, "loss": 1.0 / step})
        records.append({"step": step, "quality/fid": 50.0 - step / 10, "quality/fid_lo": 45.0 - step / 10,
                        "quality/fid_hi": 55.0 - step / 10, "quality/fid_floor": 3.0, "quality/fid_floor_lo": 2.0,
                        "quality/fid_floor_hi": 4.0, "quality/top1": 0.2, "quality/top1_ceiling": 0.9,
                        "quality/top1_chance": 0.01, "quality/n": 128, "quality/candidates": 100,
                        "quality/features": "clip:runs/demo/clip@1234abcd", "eval/seconds": 9.0})
    panels = metric_panels(records)
    assert panels["quality/fid"] == ["quality/fid", "quality/fid_lo", "quality/fid_hi", "quality/fid_floor",
                                     "quality/fid_floor_lo", "quality/fid_floor_hi"]
    assert panels["quality/top1"] == ["quality/top1", "quality/top1_ceiling", "quality/top1_chance"]
    assert set(panels) == {"loss", "quality/fid", "quality/top1", "eval/seconds"}  # n and candidates: bookkeeping
    fig = curves_figure({"run": records})
    fid_ax = next(ax for ax in fig.axes if ax.get_title() == "quality/fid")
    labels = [line.get_label() for line in fid_ax.get_lines()]
    assert labels == ["quality/fid", "floor"]  # the interval is a band, the floor a line at its value
    assert len(fid_ax.collections) == 1 and fid_ax.get_lines()[1].get_ydata()[0] == 3.0
    top1_ax = next(ax for ax in fig.axes if ax.get_title() == "quality/top1")
    assert [line.get_label() for line in top1_ax.get_lines()] == ["quality/top1", "ceiling", "chance"]
