"""The exponential moving average of trained weights, for every stage that keeps one: diffusers'
EMAModel, made the same way everywhere, and evaluated by swapping its weights in and out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from diffusers.training_utils import EMAModel

from ldm.train.common import LoopConfig


def make_ema(params: Iterable[torch.nn.Parameter], loop: LoopConfig, device) -> EMAModel | None:
    """diffusers' EMAModel of the trained parameters on `device` (None when loop.ema_decay is 0);
    with warm-up its decay grows as 1 - (1 + step)^(-2/3) up to ema_decay, so the average forgets
    the random initialisation quickly (Karras et al. 2024 discuss why)."""
    if not loop.ema_decay:
        return None
    ema = EMAModel(params, decay=loop.ema_decay, use_ema_warmup=loop.ema_warmup)
    ema.to(device)
    return ema


@contextlib.contextmanager
def swapped_ema(ema: EMAModel | None, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Evaluate with the EMA weights, then put the training weights back (nothing without an EMA).
    `params` are the ones the EMA averages, in its order."""
    params = list(params)
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
