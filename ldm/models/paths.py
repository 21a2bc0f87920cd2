"""What a model key of a config accepts: a diffusers directory, or a Stable Diffusion single file.

The models layer (`ldm.models`) builds and loads from diffusers directories only. A `.safetensors`
single file given for a model key (`vae=`, `text.encoder=`, `model.pretrained=`) is resolved to a
directory once, at the entry of the stage that reads it (`ldm.single_file.resolve_models`); the
configs check only that the path is one of the two.
"""

from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".safetensors"
PICKLED = (".ckpt", ".pt", ".pth", ".bin")


def is_single_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.suffix == SUFFIX and path.is_file()


def model_path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a model (None: a directory, or a .safetensors checkpoint)."""
    path = Path(path)
    if path.is_dir() or is_single_file(path):
        return None
    if path.is_file() and path.suffix in PICKLED:
        return (f"{path} is a pickled checkpoint, which can run code when loaded; convert it once with "
                f"`python infer.py {path} --allow-pickle --export-diffusers DIR` and give DIR")
    if path.is_file():
        return f"{path} is neither a diffusers directory nor a {SUFFIX} checkpoint"
    return f"no such directory or {SUFFIX} file: {path}"


def directory_only(path: str | os.PathLike, what: str) -> Path:
    """`path` as a directory for a loader of the models layer; a single file is refused, naming it,
    with the way to read it (a loader called outside a stage, which would resolve it)."""
    path = Path(path)
    if is_single_file(path):
        raise ValueError(f"{what}: {path} is a single-file checkpoint; the models layer reads diffusers "
                         "directories: pass ldm.single_file.model_dir(path) (a stage does this at its entry)")
    return path
