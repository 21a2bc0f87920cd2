"""What the training loops share: the loop settings, the accelerator, metrics, checkpoints.

Checkpoints (`<out>/checkpoints/step-N/`) hold everything a resume needs (models, optimisers,
LR schedule, EMA, every RNG, the step) through `accelerate`'s `save_state`. They are written
to a temporary directory and renamed into place (`ldm.atomic.replace_dir`), so a kill or a full
disk while saving leaves the previous checkpoint whole; at most `checkpoints_total_limit` are
kept. Nothing in them is unpickled with more than `torch.load(weights_only=True)`: models are
safetensors, and the objects registered with `accelerator.register_for_checkpointing` (EMA, LR
schedule) are written by us as safetensors + JSON (`state-<i>.safetensors`, `state-<i>.json`),
not as accelerate's pickles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from accelerate.utils import load as accelerate_load
from safetensors.torch import save_file

from ldm.atomic import replace_dir
from ldm.config import require, save_config
from ldm.safetensors_io import load_safetensors


@dataclasses.dataclass
class LoopConfig:
    steps: int = 1000                 # optimiser steps in the whole run
    batch_size: int = 16              # images per process per micro-batch
    grad_accum: int = 1               # micro-batches per optimiser step
    lr: float = 1e-4                  # peak learning rate
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up
    warmup_steps: int = 0             # linear LR warm-up, in optimiser steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0        # gradient clipping; 0 disables
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float = 0.0            # 0 disables EMA; else the max decay of diffusers' EMAModel
    ema_warmup: bool = True           # EMA warm-up (decay grows as 1 - (1 + step/inv_gamma)^-power)
    seed: int = 0
    log_every: int = 10               # steps between metrics lines (>= 1)
    eval_every: int = 0               # steps between evaluations (0: only at the end)
    save_every: int = 0               # steps between resumable checkpoints (0: only at the end)
    checkpoints_total_limit: int = 2  # resumable checkpoints kept on disk
    max_nonfinite_steps: int = 5      # consecutive non-finite losses (steps skipped) before the run stops
    report_to: Literal["none", "tensorboard", "all"] = "none"

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "num_workers": "no DataLoader reads it (images are decoded once, latents memory-mapped)"}

    def validate(self) -> None:
        require(self.steps > 0, f"train.steps must be > 0, got {self.steps}")
        require(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        require(self.grad_accum > 0, f"train.grad_accum must be > 0, got {self.grad_accum}")
        require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        require(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.log_every >= 1, f"train.log_every must be >= 1 (the metrics file is the run's record), got {self.log_every}")
        require(self.checkpoints_total_limit >= 1, "train.checkpoints_total_limit must be >= 1")
        require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops, its last checkpoint intact."""


def make_accelerator(loop: LoopConfig, out_dir: Path) -> Accelerator:
    """The run's Accelerator. It also seeds Python's, NumPy's and torch's global RNGs from
    `loop.seed`, so a run, and the RNG states its checkpoints hold, follow from its config alone."""
    trackers = None if loop.report_to == "none" else loop.report_to
    if trackers == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            trackers = None
    set_seed(loop.seed)
    return Accelerator(
        gradient_accumulation_steps=loop.grad_accum,
        mixed_precision=loop.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )


def start_run(accelerator: Accelerator, cfg, out_dir: Path, name: str) -> "MetricsLog":
    """Create the run directory, write the resolved config, open the metrics log."""
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        if accelerator.log_with:
            accelerator.init_trackers(name, config=_flat(dataclasses.asdict(cfg)))
    accelerator.wait_for_everyone()
    return MetricsLog(out_dir / "metrics.jsonl", accelerator)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


class MetricsLog:
    """Appends one JSON object per line; forwards to accelerate's trackers when configured."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path, self.accelerator = path, accelerator
        self.t0 = time.time()

    def write(self, step: int, **values) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "time": round(time.time() - self.t0, 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)


def lr_lambda(loop: LoopConfig):
    """Multiplier of the peak LR at an optimiser step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < loop.warmup_steps:
            return (step + 1) / loop.warmup_steps
        progress = (step - loop.warmup_steps) / max(1, loop.steps - loop.warmup_steps)
        if loop.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if loop.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def register_schedule(accelerator: Accelerator, scheduler) -> None:
    """Checkpoint the LR schedule without `prepare()`: accelerate's wrapper steps it once per
    process on every call, which would run warm-up and decay N times too fast on N GPUs.
    Our schedules count optimiser steps, which every process takes together."""
    accelerator.register_for_checkpointing(scheduler)


def make_optimizer(params, loop: LoopConfig, lr: float | None = None, use_8bit: bool = False) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters: torch has it for CUDA and, since 2.4, for the
    CPU, where it takes a third of the per-tensor loop's time); or bitsandbytes' 8-bit AdamW where
    installed and asked for."""
    kwargs = dict(lr=lr or loop.lr, betas=(loop.adam_beta1, loop.adam_beta2), weight_decay=loop.weight_decay)
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise RuntimeError("train.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    params = list(params)
    devices = {p.device.type for p in params if isinstance(p, torch.Tensor)}
    fused = len(devices) == 1 and devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial `.tmp-*` directories are ignored)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "ldm_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(out_dir: Path, resume: str) -> Path | None:
    """`resume` is "" (never), "latest" (newest complete checkpoint, if any) or a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "ldm_state.json").exists():
        raise FileNotFoundError(f"resume: {path} is not a complete checkpoint (no ldm_state.json)")
    return path


def save_checkpoint(accelerator: Accelerator, out_dir: Path, step: int, limit: int, extra: dict | None = None) -> Path:
    """Atomic: write into `.tmp-step-N`, mark complete, rename; then prune the oldest."""
    root = checkpoint_dir(out_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_partial(root)
    accelerator.wait_for_everyone()
    with _custom_objects_hidden(accelerator) as objects:
        accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        for i, obj in enumerate(objects):
            _save_object_state(obj.state_dict(), tmp / f"state-{i}")
    # important: save_state has no barrier at its end; every process must have written its
    # RNG file into tmp before the main process marks and renames it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # important: the marker is written last; a checkpoint without it is never resumed from.
        (tmp / "ldm_state.json").write_text(json.dumps({"step": step, **(extra or {})}))
        replace_dir(tmp, final)  # flushes every file first: a power cut cannot leave the marker without the data
        for old in list_checkpoints(out_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _remove_partial(root: Path) -> None:
    """Leftovers of an interrupted save (`.tmp-*`, `.old-*`): never complete, never resumed from."""
    for path in root.glob(".*-step-*"):
        shutil.rmtree(path, ignore_errors=True)


def resume(accelerator: Accelerator, out_dir: Path, resume_from: str, limit: int) -> tuple[int, NonFiniteGuard]:
    """(step, non-finite guard) from the checkpoint `resume_from` names (see `resolve_resume`), or
    (0, a fresh guard) when there is none. The guard keeps counting the steps it skipped before."""
    path = resolve_resume(out_dir, resume_from)
    if path is None:
        return 0, NonFiniteGuard(limit)
    state = load_checkpoint(accelerator, path)
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return state["step"], NonFiniteGuard.from_state(limit, state)


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    _check_rng_state(accelerator, path)
    with _custom_objects_hidden(accelerator) as objects:
        accelerator.load_state(str(path))
    for i, obj in enumerate(objects):
        obj.load_state_dict(load_object_state(path, i, _tensor_device(obj.state_dict())))
    return json.loads((path / "ldm_state.json").read_text())


def _check_rng_state(accelerator: Accelerator, path: Path) -> None:
    """accelerate's load_state skips an RNG file it cannot read with a log line only, which would
    resume with other random draws than the interrupted run; read it first and fail loudly. A
    missing one is a run resumed on more processes than it was saved from: those start anew."""
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.exists():
        warnings.warn(f"resume: no {rng_file.name} in {path} (saved from fewer processes); process "
                      f"{accelerator.process_index} keeps its seeded RNG state")
        return
    try:
        accelerate_load(rng_file, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"resume: cannot read {rng_file} with torch.load(weights_only=True): {err}") from err


@contextlib.contextmanager
def _custom_objects_hidden(accelerator: Accelerator):
    """Hide the objects registered with register_for_checkpointing from save_state/load_state.

    important: accelerate pickles them and loads them back with torch.load(weights_only=False),
    which runs whatever code a tampered checkpoint holds; we write them as safetensors + JSON.
    A checkpoint holding accelerate's `custom_checkpoint_*.pkl` is then refused by load_state
    (more files than registered objects) before anything is unpickled."""
    objects, accelerator._custom_objects = accelerator._custom_objects, []
    try:
        yield objects
    finally:
        accelerator._custom_objects = objects


def _save_object_state(state: dict, stem: Path) -> None:
    """A state dict as `<stem>.safetensors` (its tensors) + `<stem>.json` (the rest, with each
    tensor replaced by {"tensor": key}; tuples come back as lists). What JSON cannot hold
    exactly (a non-string key, an object) is an error here, not a surprise at resume."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any):
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value.detach().contiguous().cpu()
            return {"tensor": key}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {"dict": {k: encode(v) for k, v in value.items()}}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"checkpoint: cannot store {value!r:.80} in a state dict without pickle")

    tree = encode(state)
    save_file(tensors, stem.with_suffix(".safetensors"))
    stem.with_suffix(".json").write_text(json.dumps(tree))


def load_object_state(checkpoint: Path, index: int, device: torch.device | str = "cpu") -> dict:
    """The state dict of the `index`-th object the loop registered with register_for_checkpointing
    (in the order it registered them: the LR schedule, then the EMA), as saved in `checkpoint`."""
    stem = checkpoint / f"state-{index}"
    tensors = load_safetensors(stem.with_suffix(".safetensors"), device=str(device))

    def decode(value: Any):
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            return tensors[value["tensor"]] if "tensor" in value else {k: decode(v) for k, v in value["dict"].items()}
        return value

    return decode(json.loads(stem.with_suffix(".json").read_text()))


def _tensor_device(state: dict) -> torch.device:
    """Where an object keeps its tensors, so they load back there (the EMA: the accelerator's device)."""
    values = [t for v in state.values() for t in (v if isinstance(v, (list, tuple)) else [v])]
    tensors = [t for t in values if isinstance(t, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


# ----------------------------------------------------------------------------- data order


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The batches of one epoch: a permutation fixed by (seed, epoch), cut into global batches,
    each split across processes. A pure function, so a resumed run sees the same data order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    global_batch = batch_size * world
    batches = []
    for start in range(0, n - global_batch + 1, global_batch):
        chunk = order[start : start + global_batch]
        batches.append(chunk[rank * batch_size : (rank + 1) * batch_size])
    if not batches:
        raise ValueError(f"dataset of {n} items is smaller than one global batch ({global_batch})")
    return batches


def batch_indices(n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world: int = 1) -> Iterator[list[int]]:
    """Endless stream of index batches starting at global batch number `start_batch`."""
    per_epoch = len(epoch_batches(n, batch_size, seed, 0, rank, world))
    epoch, offset = divmod(start_batch, per_epoch)
    while True:
        for batch in epoch_batches(n, batch_size, seed, epoch, rank, world)[offset:]:
            yield batch
        epoch, offset = epoch + 1, 0


def sample_generators(seed: int, step: int, micro_batch: int, first: int, count: int) -> list[torch.Generator]:
    """One CPU generator per sample, fixed by (seed, optimiser step, micro-batch, the sample's place
    in the global batch): a sample gets the same draws (flip, posterior sample, caption changes and
    dropout, noise, timestep) on one process or many, and after a resume. `first` is this process's
    first place (rank x per-process batch). Each is used as diffusers' pipelines use a list of them:
    item i of every batched draw comes from generator i (see `uniform`, diffusers' randn_tensor)."""
    seeds = (np.random.SeedSequence([seed, step, micro_batch, first + i]).generate_state(1, np.uint64)[0] for i in range(count))
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def uniform(generators: list[torch.Generator]) -> torch.Tensor:
    """U[0, 1) draws, item i from generators[i]."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])


class NonFiniteGuard:
    """Counts consecutive non-finite losses; the caller skips those steps.

    Each loss of a step counts its own run (`ok(loss, name)`): a GAN's generator that is NaN on
    every step must stop the run even while the discriminator's loss, checked in between, is finite.
    """

    def __init__(self, limit: int, in_a_row: int | dict[str, int] = 0, total: int = 0):
        # a checkpoint from before the names held one count: the main loss's ("")
        self.limit, self.total = limit, total
        self.runs = dict(in_a_row) if isinstance(in_a_row, dict) else {"": in_a_row}

    @property
    def in_a_row(self) -> int:
        """The longest current run of non-finite losses."""
        return max(self.runs.values(), default=0)

    def state(self) -> dict:
        """What a checkpoint keeps (its ldm_state.json), so that a resumed run counts on."""
        return {"nonfinite": {"in_a_row": dict(self.runs), "total": self.total}}

    @classmethod
    def from_state(cls, limit: int, state: dict) -> "NonFiniteGuard":
        """The guard a checkpoint's `state()` describes; a fresh one for a checkpoint without it."""
        return cls(limit, **state.get("nonfinite", {}))

    def ok(self, loss: torch.Tensor, name: str = "") -> bool:
        """Whether `loss` (the one called `name`, if a step has several) is finite on every process."""
        if _finite_everywhere(loss):
            self.runs[name] = 0
            return True
        self.runs[name] = self.runs.get(name, 0) + 1
        self.total += 1
        if self.runs[name] >= self.limit:
            raise NonFiniteLossError(
                f"{self.runs[name]} non-finite {name + ' ' if name else ''}losses in a row "
                f"(limit train.max_nonfinite_steps={self.limit}); stopping. The last checkpoint is intact: "
                "lower train.lr or use bf16 instead of fp16, then resume."
            )
        return False


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process.

    important: all processes must skip together. One that skips backward() while the others run
    it pairs its next gradient all-reduce with their current one: wrong averages, then a hang."""
    finite = torch.isfinite(loss.detach()).all().to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)
