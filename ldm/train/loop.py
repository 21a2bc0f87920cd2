"""The skeleton every training stage shares: steps, cadence, the final save, the end.

A stage sets up its models, data and optimisers, resumes (`ldm.train.common.resume`), and hands
`run_loop` three functions of its own:

    train_step(step) -> metrics   one optimiser step (all its micro-batches, the LR schedule, the
                                  EMA); the metrics of that step, as numbers or 0-d tensors (read,
                                  and so synchronised, only when written)
    evaluate(step)                a periodic evaluation, main process only (optional)
    export(step)                  after the last step: export and final figures, main process only

The loop owns what used to be written out in each stage: the progress bar (main process), a
metrics line every `log_every` steps and at the last (with `skipped`, the non-finite steps the
guard has counted so far), `evaluate` every `eval_every` steps, a resumable checkpoint every
`save_every` steps and at the end (holding the guard's count), then `export` and accelerate's end
of training. The last step is not evaluated by the loop: `export` sees the final (EMA) weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ldm.train.common import LoopConfig, MetricsLog, NonFiniteGuard, save_checkpoint


def run_loop(accelerator: Accelerator, loop: LoopConfig, out_dir: Path, log: MetricsLog, guard: NonFiniteGuard,
             step: int, name: str, train_step: Callable[[int], dict], evaluate: Callable[[int], None] | None = None,
             export: Callable[[int], None] | None = None, shown: str = "loss") -> int:
    """Run optimiser steps from `step` (0, or where a checkpoint left off) to `loop.steps` (module
    docstring); `name` labels the progress bar, which shows the metric `shown`. Returns the last step."""
    progress = tqdm(total=loop.steps, initial=step, desc=name, disable=not accelerator.is_local_main_process)
    while step < loop.steps:
        metrics = train_step(step)
        step += 1
        progress.update(1)
        if step % loop.log_every == 0 or step == loop.steps:
            metrics = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
            progress.set_postfix({shown: f"{metrics[shown]:.4f}"})
            log.write(step, **metrics, skipped=guard.total)
        # the main process alone: every rank would evaluate the same images and write the same files
        if evaluate and loop.eval_every and step % loop.eval_every == 0 and step < loop.steps and accelerator.is_main_process:
            evaluate(step)
        if loop.save_every and step % loop.save_every == 0 and step < loop.steps:
            save_checkpoint(accelerator, out_dir, step, loop.checkpoints_total_limit, guard.state())
    progress.close()
    save_checkpoint(accelerator, out_dir, step, loop.checkpoints_total_limit, guard.state())
    if export is not None and accelerator.is_main_process:
        export(step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return step
