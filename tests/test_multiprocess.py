"""Several processes: stage 3 on 2 CPU processes (torch.distributed over gloo, launched as on GPUs
with `accelerate launch --multi_gpu`) trains the same model as 1 process with the same global
batch, a loss that is NaN on one process only included. (The encode stage on 2 processes:
tests/test_cache.py::test_two_process_encode_equals_one_process.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

import ldm.train.ldm as train_ldm_module
from ldm.train.common import epoch_batches, sample_generators, uniform
from ldm.train.ldm import size_batches, train_ldm

from fixtures_runs import ENV, REPO, latents, ldm_args, ldm_cfg, tensors_of  # noqa: F401  (fixture)

NAN_CALL = 3  # the loss of this micro-batch (the third step's) is NaN: on process 1 only, with 2

# Runs train_ldm.py as the CLI does, with the loss of one micro-batch NaN on process 1.
DRIVER = f"""
import os, runpy, sys
import ldm.train.ldm as train_ldm_module

real_loss, calls = train_ldm_module.diffusion_loss, []

def loss(*args):
    calls.append(1)
    nan = len(calls) == {NAN_CALL} and os.environ["RANK"] == "1"
    return real_loss(*args) * (float("nan") if nan else 1.0)

train_ldm_module.diffusion_loss = loss
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: list[str], timeout: float = 240) -> tuple[int, str]:
    """(exit status, stderr) of `script` on 2 processes. A process group of its own: when a
    collective hangs (one process waiting for the other), the timeout kills launcher and workers."""
    # The shipped DDP config, on 2 processes. `--cpu --num_processes 2` would start ONE process
    # unless launched through mpirun (accelerate 1.15); the multi-GPU launcher (torchrun) with
    # ACCELERATE_USE_CPU gives two gloo processes on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
              "--num_processes", "2", "--main_process_port", str(free_port())]
    proc = subprocess.Popen([*launch, *script], env={**ENV, "ACCELERATE_USE_CPU": "true"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stderr = proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the 2-process run hung for {timeout} s (a collective waiting for the other process)")
    return proc.returncode, stderr


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_accelerate_configs_load(path):
    config = load_config_from_file(str(path))
    assert config.num_processes == 8 * config.num_machines
    deepspeed = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if deepspeed:
        assert isinstance(json.loads((REPO / deepspeed).read_text())["train_micro_batch_size_per_gpu"], int)


def test_the_processes_split_the_same_global_batches():
    """The batches of 2 processes of 2 are, side by side, the batches of 1 process of 4."""
    for epoch in range(3):
        whole = epoch_batches(26, 4, seed=5, epoch=epoch)
        halves = [epoch_batches(26, 2, seed=5, epoch=epoch, rank=r, world=2) for r in range(2)]
        assert [a + b for a, b in zip(*halves)] == whole
    groups = {"4x4": list(range(20)), "4x6": list(range(20, 32))}
    one, two = size_batches(groups, 4, seed=5), [size_batches(groups, 2, 5, 0, r, 2) for r in range(2)]
    for _ in range(12):
        assert next(two[0]) + next(two[1]) == next(one)


def test_a_sample_gets_the_same_draws_on_any_process():
    whole = uniform(sample_generators(7, step=3, micro_batch=1, first=0, count=4))
    halves = [uniform(sample_generators(7, step=3, micro_batch=1, first=2 * r, count=2)) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(whole, uniform(sample_generators(7, step=4, micro_batch=1, first=0, count=4)))


def test_two_processes_train_the_same_unet_as_one(latents, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    (tmp_path / "driver.py").write_text(DRIVER)
    status, stderr = launch_two_processes([str(tmp_path / "driver.py"), str(REPO / "train_ldm.py"),
                                           *ldm_args(two, latents, "train.batch_size=2")])
    assert status == 0, stderr[-3000:]

    real_loss, calls = train_ldm_module.diffusion_loss, []

    def loss(*args):
        calls.append(1)
        return real_loss(*args) * (float("nan") if len(calls) == NAN_CALL else 1.0)

    monkeypatch.setattr(train_ldm_module, "diffusion_loss", loss)
    train_ldm(ldm_cfg(one, latents, "train.batch_size=4"))

    a, b = tensors_of(two), tensors_of(one)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)  # Adam: 1e-3 a step at most
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    # process 0 writes the metrics: it skipped the step where only process 1 had a NaN
    assert [line["skipped"] for line in lines if "skipped" in line] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert sorted(p.name for p in (two / "checkpoints" / "step-8").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
