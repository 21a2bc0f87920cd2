"""Opening .safetensors files, with an error that says what is wrong and with which file.

safetensors reports a truncated or corrupt file as `SafetensorError: Error while deserializing
header: ...`, raised from Rust with no file name; a run that opens a dozen files (checkpoint
state, cache shards, single files, LoRAs) then leaves the user to guess which one. Every place
we open one goes through `open_safetensors`.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open


class UnreadableSafetensorsError(ValueError):
    """A .safetensors file that cannot be read: truncated, corrupt, or not safetensors at all."""


def unreadable_safetensors(path: str | os.PathLike, err: Exception) -> UnreadableSafetensorsError:
    return UnreadableSafetensorsError(
        f"{path}: not a readable .safetensors file ({err}); it is truncated or corrupt, e.g. by an "
        "interrupted download or copy: download, copy or write it again")


def open_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """`safe_open(path)` (use it in a `with`), or an UnreadableSafetensorsError naming the file.

    safetensors checks the header, and that the data covers it, when it opens the file, so a
    truncated or corrupt file fails here, before any tensor is read."""
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except SafetensorError as err:
        raise unreadable_safetensors(path, err) from err


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the file, as safetensors.torch.load_file gives them."""
    with open_safetensors(path, device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
