"""A truncated or corrupt .safetensors file gives an error that names it, wherever ldm opens one:
single-file checkpoints, LoRAs, latent cache shards, checkpoint state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm.data.cache import map_safetensors
from ldm.export import import_single_file, load_checkpoint
from ldm.infer import _ldm_record, fuse_loras
from ldm.safetensors_io import UnreadableSafetensorsError, load_safetensors
from ldm.train.common import load_object_state


def _damaged(path, how: str):
    save_file({"x": torch.arange(64, dtype=torch.float32)}, path, metadata={"records": "[]"})
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) - 100], "garbage": b"not safetensors at all" * 4, "empty": b""}[how])
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_damaged_file_is_named_wherever_it_is_opened(tmp_path, how):
    bad = _damaged(tmp_path / "model.safetensors", how)
    readers = [load_safetensors, load_checkpoint, import_single_file, _ldm_record, map_safetensors,
               lambda p: fuse_loras(None, [(p, 1.0)])]  # checked before diffusers sees it
    for read in readers:
        with pytest.raises(UnreadableSafetensorsError, match=rf"{bad}: not a readable \.safetensors file"):
            read(bad)
    checkpoint = tmp_path / "step-1"
    checkpoint.mkdir()
    state = _damaged(checkpoint / "state-0.safetensors", how)
    with pytest.raises(UnreadableSafetensorsError, match=rf"{state}: not a readable"):
        load_object_state(checkpoint, 0)
