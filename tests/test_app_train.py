"""The app's Train tab: the toy trainer (ldm/train/toy.py) in plain Python, then the page in a real browser.

The trainer tests run a few dozen steps of the 32 px denoiser at batch 4-8 on a few dozen images
(about a second each on a busy core). The browser test starts `python app.py TINY_PIPELINE` as
tests/test_app_browser.py does, opens the Train tab in headless Chromium, starts a short training,
waits for the loss curve to be redrawn, checks that a second visitor is told "busy", stops, samples
and compares timesteps.
"""

import contextlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest_app import tiny_pipeline_dir  # noqa: F401  (fixture)
from PIL import Image
from test_app_browser import (CHROMIUM_ARGS, TIMEOUT_MS, _free_port, _import_or_install, _wait_for_image,
                              _wait_until_serving, chromium)  # noqa: F401  (fixture)

from ldm.app import RequestError, TrainTab, build_parser, build_train_app, status_line
from ldm.diffusion import make_train_scheduler
from ldm.train.toy import (OBJECTIVES, PREVIEW_IMAGES, RESOLUTION, SCHEDULES, ToyLimits, ToySettings, ToyTrainer,
                           TrainerBusy, load_toy_data)
from ldm.viz import figure_to_image, forward_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(batch_size=4, num_images=32, preview_every=0)   # a run that costs little
LONG = 2000                                                   # steps of a run that is stopped, not finished


def _settings(**overrides) -> ToySettings:
    return ToySettings(**{**SMALL, "steps": 3, **overrides})


def _wait_for_step(trainer: ToyTrainer, step: int, timeout: float = 120, field: str = "step") -> None:
    deadline = time.monotonic() + timeout
    while getattr(trainer.status(), field) < step:
        assert trainer.status().state != "failed", trainer.status().message
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s: {trainer.status()}"
        time.sleep(0.05)


@pytest.fixture
def trainer():
    """A trainer whose training thread is stopped and joined after the test, whatever happened."""
    made = ToyTrainer(ToyLimits())
    yield made
    made.stop()
    made.wait(120)


def _save_images(folder, count: int, size=(40, 24), mode="RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new(mode, size, (40 * i % 256, 100, 200, 255)[: len(mode)]).save(folder / f"{i:02d}.png")


# ----------------------------------------------------------------------------- the trainer


def test_loss_goes_down_on_shapes(trainer):
    trainer.start(_settings(steps=40, batch_size=8, num_images=64, lr=2e-3, schedule="linear", objective="epsilon"))
    status = trainer.wait(300)
    assert status.state == "done" and status.step == 40 and len(status.losses) == 40, status
    first, last = np.mean(status.losses[:5]), np.mean(status.losses[-5:])
    assert last < 0.5 * first, (first, last)           # epsilon starts near 1 (the noise's variance)
    assert status.preview is not None and status.preview_step == 40   # the final grid is always drawn
    side = 4 * (RESOLUTION + 2) + 2
    assert status.preview.size == (side, side) and PREVIEW_IMAGES == 16


def test_a_seed_repeats_the_run(trainer):
    losses = []
    for _ in range(2):
        trainer.start(_settings(steps=3, seed=7))
        losses.append(trainer.wait(120).losses)
    assert losses[0] == losses[1]


@pytest.mark.parametrize("schedule, objective", [(s, o) for o in OBJECTIVES if o != "flow" for s in SCHEDULES]
                         + [("cosine", "flow")])
def test_each_schedule_and_objective_trains_and_samples(trainer, schedule, objective):
    trainer.start(_settings(schedule=schedule, objective=objective))
    status = trainer.wait(120)
    assert status.state == "done" and len(status.losses) == 3 and all(np.isfinite(status.losses)), status
    sampler = "flow-euler" if objective == "flow" else "ddpm"
    result = trainer.sample(sampler, steps=4, seed=0, num_images=2)
    assert [im.size for im in result["images"]] == [(RESOLUTION, RESOLUTION)] * 2 and result["trajectory"]
    rows = trainer.compare([0, 500, 999], image=1)
    assert list(rows) == ["x_0", "x_t", "predicted x_0"]
    assert all(r.shape == (3, 3, RESOLUTION, RESOLUTION) and 0 <= r.min() and r.max() <= 1 for r in rows.values())
    assert (rows["x_t"][0] - rows["x_0"][0]).abs().mean() < 0.02       # t = 0: hardly any noise
    assert (rows["x_t"][2] - rows["x_0"][2]).abs().mean() > 0.2        # t = 999: mostly noise
    figure = forward_figure(rows, make_train_scheduler(trainer.noise()), [0, 500, 999])
    assert figure_to_image(figure).width > 3 * RESOLUTION                # flow titles: sigma, not alpha_bar


def test_stop_keeps_the_model_and_sampling_works_after(trainer):
    trainer.start(_settings(steps=LONG))
    _wait_for_step(trainer, 2)
    assert trainer.status().running
    trainer.stop()
    status = trainer.wait(120)
    assert status.state == "stopped" and 2 <= status.step < LONG, status
    assert status.message == "the model is kept: sample it below"
    assert status.preview_step == status.step            # a last grid of the model as it was stopped
    a = trainer.sample("ddim", steps=3, seed=5, num_images=2)
    b = trainer.sample("ddim", steps=3, seed=5, num_images=2)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))   # the same model, the same seed
    assert trainer.status().step == status.step           # sampling trained nothing


def test_sampling_while_training_uses_a_copy(trainer):
    trainer.start(_settings(steps=LONG))
    _wait_for_step(trainer, 1)
    result = trainer.sample("ddim", steps=2, seed=0, num_images=1)
    assert result["image"].size == (RESOLUTION, RESOLUTION) and trainer.status().running


def test_a_second_start_while_running_is_busy(trainer):
    trainer.start(_settings(steps=LONG), owner="ann")
    _wait_for_step(trainer, 1)
    with pytest.raises(TrainerBusy, match=rf"^busy: a training started by another visitor is running \(step \d+/{LONG}\)$"):
        trainer.start(_settings(), owner="bob")
    with pytest.raises(TrainerBusy, match=r"^busy: your training is running \(step \d+/"):
        trainer.start(_settings(), owner="ann")
    with pytest.raises(TrainerBusy, match=f"only the visitor who started it can stop it, and it ends by itself after step {LONG}"):
        trainer.stop(owner="bob")
    assert trainer.status().running
    assert trainer.stop(owner="ann").state == "stopping"
    assert trainer.wait(120).state == "stopped"
    trainer.start(_settings(), owner="bob")               # free again
    assert trainer.wait(120).state == "done"


@pytest.mark.parametrize("overrides, message", [
    (dict(lr=1.0), r"learning rate must be between 1e-06 and 0.1, got 1.0"),
    (dict(lr=0.0), "learning rate must be between"),
    (dict(steps=0), r"steps must be a whole number between 1 and 2000, got 0"),
    (dict(steps=LONG + 1), r"steps must be a whole number between 1 and 2000"),
    (dict(batch_size=65), r"batch size must be a whole number between 1 and 64, got 65"),
    (dict(num_images=5000), r"images must be a whole number between 1 and 2000"),
    (dict(seed=-1), r"seed must be a whole number between 0"),
    (dict(schedule="quadratic"), r"unknown schedule 'quadratic'; choose one of linear, cosine, scaled_linear"),
    (dict(objective="x0"), r"unknown objective 'x0'; choose one of epsilon, v_prediction, flow"),
    (dict(data="/no/such/folder"), r"folder /no/such/folder does not exist"),
])
def test_bad_settings_are_refused_before_any_work(trainer, overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer.start(_settings(**overrides))
    assert trainer.status().state == "idle"


def test_folders_that_cannot_be_trained_on(trainer, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.png").write_bytes(b"not a folder")
    with pytest.raises(ValueError, match="holds no images"):
        trainer.start(_settings(data=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="is not a folder"):
        trainer.start(_settings(data=str(tmp_path / "file.png")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG truncated")   # listed as an image, unreadable when read
    trainer.start(_settings(data=str(broken)))
    status = trainer.wait(120)
    assert status.state == "failed" and "holds no readable images" in status.message, status
    with pytest.raises(ValueError, match="no model yet"):
        trainer.sample("ddim", 2)


def test_a_prepared_folder_trains_without_its_heldout_images(trainer, tmp_path):
    folder = tmp_path / "prepared"
    _save_images(folder / "images", 6, size=(64, 48))
    _save_images(folder / "rgba", 2, mode="RGBA")
    (folder / "heldout.txt").write_text("images/00.png\nimages/01.png\n")
    data = load_toy_data(_settings(data=str(folder), num_images=100))
    assert data.shape == (6, 3, RESOLUTION, RESOLUTION) and -1 <= data.min() and data.max() <= 1
    assert load_toy_data(_settings(data=str(folder), num_images=3)).shape[0] == 3   # at most num_images
    trainer.start(_settings(data=str(folder), steps=2))
    assert trainer.wait(120).state == "done"
    with pytest.raises(ValueError, match=r"image must be between 0 and 5"):
        trainer.compare([0, 10], image=6)


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        ToyLimits(max_batch=0).validate()


# ----------------------------------------------------------------------------- the tab, no browser


def test_train_tab_in_plain_python(tmp_path):
    folder = tmp_path / "emoji-32"
    _save_images(folder, 4)
    tab = TrainTab(ToyTrainer(ToyLimits(max_steps=LONG)), [str(folder)])
    assert tab.data_choices == ["shapes", "emoji-32"]
    with pytest.raises(ValueError, match="another choice is already called 'emoji-32'"):
        TrainTab(ToyTrainer(), [str(folder), str(folder) + "/"])
    key, line, plot, grid, running = tab.poll()
    assert line.startswith("no training yet") and plot is None and grid is None and not running
    with pytest.raises(RequestError, match="unknown data '/etc'; choose one of shapes, emoji-32"):
        tab.start("/etc", "cosine", "epsilon", 3, 2e-3, 4, 0, 0)
    with pytest.raises(RequestError, match="learning rate must be a number, got 'fast'"):
        tab.start("shapes", "cosine", "epsilon", 3, "fast", 4, 0, 0)
    try:
        assert tab.start("shapes", "cosine", "v_prediction", LONG, 2e-3, 4, 0, 2, owner="ann").startswith("started: shapes")
        _wait_for_step(tab.trainer, 2, field="preview_step")
        assert tab.start("emoji-32", "cosine", "epsilon", 3, 2e-3, 4, 0, 0, owner="bob").startswith(
            "busy: a training started by another visitor is running (step ")
        assert "only the visitor who started it" in tab.stop(owner="bob")
        key2, line, plot, grid, running = tab.poll()
        assert key2 != key and running and line.startswith("**running: step ") and plot.width > 100 and grid is not None
        assert tab.stop(owner="ann").startswith("stopping")
    finally:
        tab.trainer.stop()
        tab.trainer.wait(120)
    status = tab.trainer.status()
    assert status.state == "stopped" and status_line(status).startswith(f"**stopped: step {status.step}/{LONG}")
    strip, samples, summary = tab.sample("auto", 3, 0)
    assert strip.width > strip.height and samples.width == 4 * (4 * (RESOLUTION + 2) + 2)
    assert summary.startswith("8 images, ddim, 3 steps, seeds 0..7")
    with pytest.raises(ValueError, match="scheduler 'flow-euler' samples flow models"):
        tab.sample("flow-euler", 3, 0)
    with pytest.raises(RequestError, match="sampling steps must be between 1 and 200"):
        tab.sample("ddim", 500, 0)
    assert tab.compare("0,500,999", 0, 0).width > 3 * RESOLUTION
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 999\]"):
        tab.compare("0,1000", 0, 0)


def test_the_command_line_of_the_train_tab(tmp_path):
    args = build_parser().parse_args(["--train-data", str(tmp_path), "--train-max-steps", "50"])
    assert args.pipeline is None and args.train_data == [str(tmp_path)] and args.train_max_steps == 50
    from ldm.app import main, train_tab

    with pytest.raises(ValueError, match=f"--train-data: folder {tmp_path} holds no images"):
        train_tab(args)
    with pytest.raises(SystemExit, match="nothing to serve"):
        main(["--no-train"])
    _import_or_install("gradio", "gradio>=5")
    assert build_train_app(TrainTab(ToyTrainer())) is not None


# ----------------------------------------------------------------------------- browser

BROWSER_STEPS = 1000    # the server's --train-max-steps; the run is stopped long before


@pytest.fixture(scope="module")
def train_server(tiny_pipeline_dir, tmp_path_factory):  # noqa: F811
    """`python app.py TINY --port N` (the whole app, the Train tab in it); stopped afterwards."""
    _import_or_install("gradio", "gradio>=5")
    port = _free_port()
    log = tmp_path_factory.mktemp("app-train") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", str(tiny_pipeline_dir), "--port", str(port), "--device", "cpu",
                                 "--train-max-steps", str(BROWSER_STEPS)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_serving(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _image_src(page, selector: str) -> str | None:
    return page.evaluate("sel => { const img = document.querySelector(sel + ' img'); return img ? img.src : null; }",
                         selector)


def _set_number(page, selector: str, value) -> None:
    """Type into a Gradio number or slider box and leave it, as a user does (the change is sent on blur)."""
    box = page.locator(f"{selector} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def test_train_in_the_browser(train_server, chromium):  # noqa: F811
    sync_api = _import_or_install("playwright.sync_api", "playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()          # one visitor; a second context below is another
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(train_server, wait_until="domcontentloaded")
            page.get_by_role("tab", name="Train").click()
            page.wait_for_function("() => document.querySelector('#train-status').innerText.includes('no training yet')")
            _set_number(page, "#train-steps", BROWSER_STEPS)
            _set_number(page, "#train-batch", 4)
            _set_number(page, "#train-preview-every", 5)
            page.locator("#train-start").click()
            page.wait_for_function("() => document.querySelector('#train-message').innerText.startsWith('started: shapes')")

            # the curve is drawn, then redrawn as steps go by, while the page answers
            _wait_for_image(page, "#train-loss")
            first = _image_src(page, "#train-loss")
            page.wait_for_function("src => { const img = document.querySelector('#train-loss img');"
                                   " return img && img.complete && img.src !== src; }", arg=first)
            page.wait_for_function("() => /running: step [1-9]/.test(document.querySelector('#train-status').innerText)")
            assert _wait_for_image(page, "#train-preview") > 4 * RESOLUTION    # the sample grid, enlarged

            # a second visitor is told the server is busy, and watches
            other = browser.new_context().new_page()
            other.set_default_timeout(TIMEOUT_MS)
            other.goto(train_server, wait_until="domcontentloaded")
            other.get_by_role("tab", name="Train").click()
            other.locator("#train-start").click()
            other.wait_for_function("() => document.querySelector('#train-message').innerText.startsWith("
                                    "'busy: a training started by another visitor is running (step ')")
            other.locator("#train-stop").click()
            other.wait_for_function("() => document.querySelector('#train-message').innerText.includes("
                                    "'only the visitor who started it can stop it')")
            other.wait_for_function("() => /running: step/.test(document.querySelector('#train-status').innerText)")
            other.context.close()

            # Stop keeps the model; then sample it and compare timesteps
            page.locator("#train-stop").click()
            page.wait_for_function("() => /stopped: step \\d+\\/1000/.test(document.querySelector('#train-status').innerText)")
            assert "the model is kept" in page.locator("#train-status").inner_text()
            page.locator("#train-sample").click()
            assert _wait_for_image(page, "#train-samples") == 4 * (4 * (RESOLUTION + 2) + 2)
            assert _wait_for_image(page, "#train-trajectory") > 4 * RESOLUTION
            page.wait_for_function("() => document.querySelector('#train-sample-summary').innerText.includes('8 images, ddim')")
            page.locator("#train-compare").click()
            assert _wait_for_image(page, "#train-comparison") > 7 * RESOLUTION
            with contextlib.suppress(Exception):   # the screenshot in the docs, when asked for
                if os.environ.get("LDM_SCREENSHOT"):
                    page.screenshot(path=os.environ["LDM_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
