"""Reliability: runs killed at a random step resume exactly; checkpoints survive a kill or a full
disk while being written; non-finite losses are skipped, then stop the run; impossible configs
fail before any work; pickles in checkpoints never run.

(Resume of the encode stage after a kill: tests/test_cache.py::test_resume_after_kill_equals_uninterrupted_encode.
Several processes: tests/test_multiprocess.py.)
"""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import ldm.train.ldm as train_ldm_module
from ldm.config import load_config
from ldm.data.cache import CacheMismatchError
from ldm.infer import load_pipeline
from ldm.models.presets import vae_config
from ldm.losses import VAELoss
from ldm.train.common import NonFiniteGuard, NonFiniteLossError, list_checkpoints, lr_lambda, resolve_resume
from ldm.train.ldm import LDMTrainConfig, train_ldm
from ldm.train.vae import VAETrainConfig, train_vae

from fixtures_runs import ENV, REPO, latents, ldm_args, ldm_cfg, tensors_of  # noqa: F401  (fixture)

# Stage 1: warm-up then cosine LR, EMA, 2 accumulated micro-batches, the discriminator from step 3,
# random crops: every piece of state a resume must bring back.
VAE = ["data.source.kind=shapes", "data.source.size=32", "data.source.resolution=32", "data.transform.resolution=32",
       "data.eval_size=4", "model.preset=tiny-f4", "train.batch_size=4", "train.grad_accum=2", "train.lr=1e-3",
       "train.warmup_steps=2", "train.lr_schedule=cosine", "train.ema_decay=0.9", "train.log_every=1",
       "train.save_every=1", "train.checkpoints_total_limit=2", "loss.disc_start=3", "loss.disc_channels=8",
       "loss.disc_layers=2", "scale_images=8", "grid_images=2", "crop_size=16", "train.steps=8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bitwise equality needs deterministic settings: the killed subprocesses run on one thread
    (ENV), so the in-process runs they are compared with must too; several threads may sum in
    another order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vae_cfg(out_dir: Path, *overrides: str) -> VAETrainConfig:
    return load_config(VAETrainConfig, None, [f"out_dir={out_dir}", *VAE, *overrides])


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise-equal exports, and the same files in the last checkpoint (weights, optimisers, EMA,
    LR schedule, RNG states, step), byte for byte."""
    a, b = tensors_of(run), tensors_of(reference)
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    mine, theirs = list_checkpoints(run)[-1], list_checkpoints(reference)[-1]
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for path in mine.iterdir():
        assert path.read_bytes() == (theirs / path.name).read_bytes(), path.name


def kill_once_checkpointed(command: list[str], run: Path, step: int) -> None:
    """Start `command`, SIGKILL it as soon as checkpoint `step` exists; check it did not finish."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run / "checkpoints" / f"step-{step}" / "ldm_state.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"killed before step {step} was saved: " + proc.stderr.read().decode()[-2000:]
    left = list_checkpoints(run)
    assert left and int(left[-1].name.split("-")[1]) < 8, f"the run finished before the kill at step {step}"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vae_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae-ref")
    train_vae(vae_cfg(out))
    return out


@pytest.fixture(scope="module")
def ldm_reference(latents, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ldm-ref")
    train_ldm(ldm_cfg(out, latents))
    return out


# ----------------------------------------------------------------------------- exact resume


def test_vae_killed_at_a_random_step_resumes_exactly(vae_reference, tmp_path):
    run = tmp_path / "run"
    step = random.randint(1, 6)
    print(f"killed once checkpoint {step} was written")
    kill_once_checkpointed([sys.executable, str(REPO / "train_vae.py"), f"out_dir={run}", *VAE], run, step)
    train_vae(vae_cfg(run))  # re-running the same command resumes
    assert_same_run(run, vae_reference)


def test_the_lr_schedule_counts_optimiser_steps_not_micro_batches(vae_reference):
    """Warm-up over 2 steps then cosine, with 2 micro-batches a step: each logged rate is the
    schedule at the optimiser step (the VAE logs the rate of the next step)."""
    cfg = vae_cfg(vae_reference)
    lines = [json.loads(line) for line in (vae_reference / "metrics.jsonl").read_text().splitlines()]
    rates = [line["lr"] for line in lines if "rec" in line]
    assert rates == pytest.approx([cfg.train.lr * lr_lambda(cfg.train)(step) for step in range(1, 9)])
    # the discriminator's: the same warm-up and decay, counted from its first step (disc_start=3)
    disc_rates = [line["disc_lr"] / cfg.train.lr for line in lines if "rec" in line]
    assert disc_rates == pytest.approx([0, 0, 0.5, 1.0, 1.0, 0.75, 0.25, 0])


# ----------------------------------------------------------------------------- a kill or a full disk while saving


KILL_DURING_SAVE = """
import os, runpy, signal, sys
import accelerate.checkpointing as checkpointing

real_save = checkpointing.save

def save(obj, f, *args, **kwargs):  # the first file of checkpoint {step} is written, then the kill
    real_save(obj, f, *args, **kwargs)
    if ".tmp-step-{step}" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)

checkpointing.save = save
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_unet_killed_while_saving_a_random_step_resumes_exactly(latents, ldm_reference, tmp_path):
    """Killed in the middle of writing checkpoint k: the half-written one is ignored, and
    re-running the same command resumes from k - 1 and ends as the uninterrupted run."""
    run = tmp_path / "run"
    step = random.randint(2, 7)
    print(f"killed while writing checkpoint {step}")
    driver = KILL_DURING_SAVE.format(step=step, script=str(REPO / "train_ldm.py"), args=ldm_args(run, latents))
    result = subprocess.run([sys.executable, "-c", driver], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (run / "checkpoints" / f".tmp-step-{step}").is_dir(), step  # half written, as the kill left it
    assert resolve_resume(run, "latest") == run / "checkpoints" / f"step-{step - 1}"
    train_ldm(ldm_cfg(run, latents))
    assert not list((run / "checkpoints").glob(".*"))
    assert_same_run(run, ldm_reference)


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint(vae_reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = accelerate.checkpointing.save

    def save(obj, f, *args, **kwargs):
        if ".tmp-step-4" in str(f):
            Path(f).write_bytes(b"\0" * 100)  # what fits before the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    with pytest.raises(OSError, match="No space left"):
        train_vae(vae_cfg(run))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["step-2", "step-3"]
    assert resolve_resume(run, "latest") == run / "checkpoints" / "step-3"
    train_vae(vae_cfg(run))
    assert_same_run(run, vae_reference)


# ----------------------------------------------------------------------------- non-finite losses


def test_nonfinite_losses_are_skipped_then_stop_the_run(latents, tmp_path, monkeypatch):
    """Losses are NaN from step 3 on: steps 3 and 4 are skipped and counted, the third NaN in a
    row (max_nonfinite_steps=3) stops the run, and checkpoint 4 holds the weights of step 2. The
    checkpoint keeps the counts: a resumed run goes on counting."""
    run = tmp_path / "run"
    real_loss, calls = train_ldm_module.diffusion_loss, []

    def nan_from_step_3(*args):
        calls.append(1)
        return real_loss(*args) * (float("nan") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(train_ldm_module, "diffusion_loss", nan_from_step_3)
    cfg = ldm_cfg(run, latents, "train.max_nonfinite_steps=3", "train.checkpoints_total_limit=5")
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row \(limit train.max_nonfinite_steps=3\)"):
        train_ldm(cfg)

    assert [p.name for p in list_checkpoints(run)] == ["step-1", "step-2", "step-3", "step-4"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["skipped"]) for line in lines] == [(1, 0), (2, 0), (3, 1), (4, 2)]
    good, last = (load_file(run / "checkpoints" / s / "model.safetensors") for s in ("step-2", "step-4"))
    for name, tensor in last.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, good[name]), name  # the NaN steps did not touch the weights
    adam = torch.load(run / "checkpoints" / "step-4" / "optimizer.bin", weights_only=True)["state"]
    assert {int(s["step"]) for s in adam.values()} == {2}

    # Re-running the same command resumes at step 4 with two NaNs already in a row: the next one
    # is the third, and the run stops before writing another checkpoint.
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train_ldm(cfg)
    assert [p.name for p in list_checkpoints(run)] == ["step-1", "step-2", "step-3", "step-4"]
    # Finite losses again (a lower lr, say): the count of skipped steps goes on from the checkpoint.
    monkeypatch.setattr(train_ldm_module, "diffusion_loss", real_loss)
    train_ldm(cfg)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["skipped"]) for line in lines if "skipped" in line][4:] == [(s, 2) for s in range(5, 9)]


# every step is skipped, so the LR schedule steps before its optimiser ever has: torch says so, as it should
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_nan_generator_stops_the_vae_run_while_its_discriminator_is_finite(tmp_path, monkeypatch):
    """The generator's and the discriminator's losses count their own runs of non-finite values;
    the checkpoint keeps both, and one written before the runs had names still resumes."""
    real_loss = VAELoss.generator_loss

    def nan_generator(self, *args, **kwargs):
        loss, logs = real_loss(self, *args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(VAELoss, "generator_loss", nan_generator)
    run = tmp_path / "run"
    cfg = vae_cfg(run, "loss.disc_start=0", "train.grad_accum=1", "train.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row \(limit train.max_nonfinite_steps=3\)"):
        train_vae(cfg)
    last = list_checkpoints(run)[-1]
    assert last.name == "step-2"
    assert json.loads((last / "ldm_state.json").read_text())["nonfinite"] == {"in_a_row": {"": 2, "discriminator": 0},
                                                                             "total": 2}
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):  # resumed: counts on
        train_vae(cfg)
    old = NonFiniteGuard.from_state(3, {"nonfinite": {"in_a_row": 2, "total": 5}})  # a checkpoint of before
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        old.ok(torch.tensor(float("nan")))


# ----------------------------------------------------------------------------- configs


def test_a_cache_from_another_vae_fails_before_any_work(latents, tmp_path):
    torch.manual_seed(1)
    AutoencoderKL(**vae_config("tiny-f4", scaling_factor=0.5)).save_pretrained(tmp_path / "other-vae")
    run = tmp_path / "run"
    cfg = load_config(LDMTrainConfig, None, [*ldm_args(run, latents), f"vae={tmp_path / 'other-vae'}"])
    with pytest.raises(CacheMismatchError, match="vae_hash: cache has '[0-9a-f]+', run expects '[0-9a-f]+'"):
        train_ldm(cfg)
    assert not run.exists()  # no run directory, config, metrics or checkpoint


# ----------------------------------------------------------------------------- untrusted files


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_load_pipeline_never_runs_a_pickled_checkpoint(tmp_path):
    marker, evil = tmp_path / "marker", tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hook": Payload(marker)}, evil)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_pipeline(evil, device="cpu")
    with pytest.raises(ValueError, match="weights_only"):
        load_pipeline(evil, device="cpu", allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize("tampered, error, message", [
    ("custom_checkpoint_0.pkl", RuntimeError, "Number of custom checkpoints"),  # accelerate's EMA, LR schedule
    ("optimizer.bin", pickle.UnpicklingError, "Weights only load failed"),
    ("random_states_0.pkl", RuntimeError, "cannot read .*random_states_0.pkl with torch.load.weights_only=True"),
])
def test_resume_never_runs_a_pickle_planted_in_a_checkpoint(vae_reference, tmp_path, tampered, error, message):
    """A checkpoint in accelerate's own format (EMA and LR schedule as pickles, which accelerate
    loads with weights_only=False), a tampered optimiser state, a tampered RNG state: the resume
    stops with an error, and the payload never runs."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(vae_reference, run)
    last = list_checkpoints(run)[-1]
    if tampered == "custom_checkpoint_0.pkl":  # one per registered object, as accelerate expects
        torch.save(Payload(marker), last / "custom_checkpoint_1.pkl")
    torch.save(Payload(marker), last / tampered)
    with pytest.raises(error, match=message):
        train_vae(vae_cfg(run))
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler runs it.
    torch.load(last / tampered, weights_only=False)
    assert marker.read_text() == "ran"
