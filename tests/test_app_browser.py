"""The web demo (ldm/app.py): its request limits, and the page in a real browser.

The browser tests start `python app.py TINY_PIPELINE --port N` as a user would, open the page
in headless Chromium (Debian's package, driven by Playwright), generate an image through the
form and check that it appears; then they stop the server. Everything talks to 127.0.0.1 only.
Chromium comes from .ci/install_browser.sh when /usr/bin/chromium is missing; the tests skip
with the reason only when that install is impossible.
"""

import contextlib
import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest_app import TINY_SIZE, save_tiny_pipeline, tiny_pipeline_dir  # noqa: F401  (fixture)
from PIL import Image

from ldm.app import Demo, Limits, RequestError, check_generation, square, usable_schedulers
from ldm.infer import load_pipeline
from ldm.sampling import SCHEDULERS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_STEPS = 10          # the server's --max-steps in these tests
SERVER_START_S = 300    # importing gradio and torch on a busy single core is slow
TIMEOUT_MS = 120_000


# ----------------------------------------------------------------------------- limits, no server


def _check(**overrides):
    request = {**dict(steps=10, width=32, height=32, num_images=1, guidance_scale=3.0, scheduler="ddim"), **overrides}
    check_generation(Limits(max_steps=20, max_size=64, max_images=2), 8, ["ddim", "euler"], **request)


def test_limits_accept_a_request_within_them():
    _check()
    _check(steps=20, width=64, height=8, num_images=2)


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=21), r"steps must be between 1 and 20 \(the server's --max-steps\), got 21"),
    (dict(steps=0), "steps must be between 1 and 20"),
    (dict(width=72), r"width must be between 8 and 64 \(the server's --max-size\), got 72"),
    (dict(height=36), "height must be a multiple of 8"),
    (dict(num_images=3), r"images must be between 1 and 2 \(the server's --max-images\)"),
    (dict(guidance_scale=1e6), "guidance scale must be between"),
    (dict(scheduler="dpm++sde"), "unknown scheduler 'dpm\\+\\+sde'; choose one of ddim, euler"),
])
def test_limits_refuse_with_a_message_naming_the_bound(overrides, message):
    with pytest.raises(RequestError, match=message):
        _check(**overrides)


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        Limits(max_steps=0).validate()


def test_usable_schedulers_honour_zero_terminal_snr(tiny_pipeline_dir, tmp_path):
    """A zero-SNR model is offered only samplers that can apply its rescaled schedule."""
    plain = usable_schedulers(load_pipeline(tiny_pipeline_dir, device="cpu").base_scheduler_config)
    zero_dir = save_tiny_pipeline(tmp_path / "zero-snr", zero_terminal_snr=True)
    zero = usable_schedulers(load_pipeline(zero_dir, device="cpu").base_scheduler_config)
    assert {"ddpm", "ddim", "euler", "dpm++2m"} <= set(zero) < set(plain) <= set(SCHEDULERS)
    assert "heun" in plain and "heun" not in zero         # HeunDiscreteScheduler has no rescale_betas_zero_snr
    has_torchsde = importlib.util.find_spec("torchsde") is not None
    assert ("dpm++sde" in plain) == has_torchsde


def test_demo_enforces_limits_and_sizes(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir, device="cpu")
    demo = Demo(pipe, Limits(max_steps=4, max_size=16, max_images=1))
    assert demo.default_size == 16                      # native 32 px, capped by --max-size
    with pytest.raises(RequestError, match="--max-steps"):
        demo.generate("a red circle", "", "ddim", 5, 3.0, 0, 16, 16, 1)
    with pytest.raises(RequestError, match="seed must be between"):
        demo.generate("a red circle", "", "ddim", 4, 3.0, -1, 16, 16, 1)
    gallery, strip, summary = demo.generate("a red circle", "", "ddim", 4, 3.0, 0, 16, 16, 1)
    assert gallery[0][0].size == (16, 16) and gallery[0][1] == "seed 0"
    assert strip.width > strip.height > 0 and summary.startswith("1 image(s), 16x16, ddim, 4 steps")
    with pytest.raises(RequestError, match="upload an image"):
        demo.forward(None, "scaled_linear", False, "0,999", False, 0)
    with pytest.raises(ValueError, match="below the smallest image"):
        Demo(pipe, Limits(max_size=4))


def test_square_crops_the_centre():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 0, 0), (10, 0, 20, 10))           # the centre third is red
    out = square(image, 8)
    assert out.size == (8, 8) and out.getpixel((4, 4)) == (255, 0, 0) and out.getpixel((0, 0))[0] > 200


# ----------------------------------------------------------------------------- browser


def _import_or_install(module: str, requirement: str):
    """The test's Python dependencies, installed with pip if missing (CI installs the dev extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    done = subprocess.run([sys.executable, "-m", "pip", "install", requirement], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{requirement} is not installed and pip could not install it: {done.stderr[-500:]}")
    importlib.invalidate_caches()
    return importlib.import_module(module)


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        done = subprocess.run(["bash", str(ROOT / ".ci" / "install_browser.sh")], capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not CHROMIUM.exists():
            pytest.skip(f"chromium missing and .ci/install_browser.sh could not install it: {done.stderr[-500:]}")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1)
    pytest.fail(f"app.py did not serve {url} within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tiny_pipeline_dir, tmp_path_factory):
    """`python app.py` on the tiny pipeline at a free port; stopped (and waited for) afterwards."""
    _import_or_install("gradio", "gradio>=5")
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", str(tiny_pipeline_dir), "--port", str(port), "--device", "cpu",
                                 "--max-steps", str(MAX_STEPS)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_serving(url, proc, log)
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def page(server, chromium):
    sync_api = _import_or_install("playwright.sync_api", "playwright")
    with sync_api.sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(profile, executable_path=str(chromium), headless=True,
                                                        args=CHROMIUM_ARGS)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.goto(server[0], wait_until="domcontentloaded")
        yield page
        context.close()


def _wait_for_image(page, selector: str) -> int:
    """Wait until an <img> under `selector` has loaded, and return its natural width."""
    page.wait_for_function(
        """sel => { const img = document.querySelector(sel + ' img');
                    return img !== null && img.complete && img.naturalWidth > 0; }""", arg=selector)
    return page.evaluate("sel => document.querySelector(sel + ' img').naturalWidth", selector)


def test_generate_an_image_in_the_browser(page):
    page.locator("#prompt textarea").fill("a small blue star at the top, on a black background")
    page.locator("#generate").click()
    assert _wait_for_image(page, "#images") == TINY_SIZE            # the generated image, at its size
    assert _wait_for_image(page, "#trajectory") > TINY_SIZE          # the denoising strip beside it
    page.wait_for_function("() => document.querySelector('#summary').innerText.includes('1 image(s)')")
    assert f"{MAX_STEPS} steps" in page.locator("#summary").inner_text()   # the slider stops at --max-steps


def test_forward_process_tab_in_the_browser(page):
    page.get_by_role("tab", name="Forward process").click()
    assert _wait_for_image(page, "#schedule-plot") > 0
    page.locator("#draw-shapes").click()
    assert _wait_for_image(page, "#source") == TINY_SIZE
    page.locator("#noise").click()
    assert _wait_for_image(page, "#forward-strip") > 7 * TINY_SIZE   # a strip of 7 timesteps, 2 rows


def test_api_refuses_a_request_over_the_limits(server):
    """An API client bypasses the page; the server still refuses, naming the bound (Gradio checks
    a slider's range itself; a side off the slider's step gets through to our check)."""
    client_module = _import_or_install("gradio_client", "gradio_client")
    client = client_module.Client(server[0], verbose=False)
    with pytest.raises(Exception, match=rf"maximum value {MAX_STEPS}\b|--max-steps"):
        client.predict("a red circle", "", "ddim", 10_000, 3.0, 0, TINY_SIZE, TINY_SIZE, 1, api_name="/generate")
    with pytest.raises(Exception, match="width must be a multiple of 8"):
        client.predict("a red circle", "", "ddim", 2, 3.0, 0, 36, TINY_SIZE, 1, api_name="/generate")
    gallery, _, summary = client.predict("a red circle", "", "ddim", 2, 3.0, 0, TINY_SIZE, TINY_SIZE, 1, api_name="/generate")
    assert len(gallery) == 1 and summary.startswith("1 image(s)")


def _outward_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), if not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_server_listens_on_loopback_only(server):
    address = _outward_address()
    if address is None:
        pytest.skip("no non-loopback address to try")
    with pytest.raises(OSError):
        socket.create_connection((address, server[1]), timeout=5).close()
