"""A single-file Stable Diffusion checkpoint wherever a diffusers directory is expected.

Encoding and training read their models from diffusers directories: `vae=` and `text.encoder=`
of stages 2 and 3, `model.pretrained=` of stages 1 and 3. Most Stable Diffusion models are
shared as one `.safetensors` file in the original layout instead (A1111's, ComfyUI's, or ours
from `infer.py --export-single-file`), so each of these keys takes such a file as well.

Each stage resolves its model keys once, at its entry (`resolve_models`): the file is imported
once (`ldm.export.import_single_file`) into a pipeline directory under the import cache,
`$LDM_CACHE/single-file/<stem>-<key>/` (default `~/.cache/ldm`), keyed by the file's absolute
path, size and modification time; every later read, from any stage or process, takes that
directory. The import is built beside it and renamed into place (`ldm.atomic.replace_dir`), under
a file lock, so concurrent processes import it once and nobody reads a half-written directory.
Configs keep the file's path, which is what the user gave. The models layer (`ldm.models`) never
sees the file: it reads directories only.

A pickled checkpoint (.ckpt) can run code when loaded, so it is not imported behind the user's
back: `infer.py MODEL.ckpt --allow-pickle --export-diffusers DIR` converts it once, explicitly.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

from ldm import export
from ldm.atomic import replace_dir
from ldm.models.paths import PICKLED, SUFFIX, is_single_file, model_path_problem  # noqa: F401 (this module's API too)

IMPORT_VERSION = 1  # part of the key: a change to the importer imports every file afresh

Config = TypeVar("Config")


def cache_root() -> Path:
    return Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm")


def model_dir(path: str | os.PathLike) -> Path:
    """The diffusers directory to read `path` from: itself, or where its single file is imported."""
    path = Path(path)
    return imported_dir(path) if is_single_file(path) else path


def resolve_models(cfg: Config, *keys: str) -> Config:
    """A copy of the stage config `cfg` in which the model path at each dotted key (e.g. "vae",
    "model.pretrained", "text.encoder") that names a single file names its imported directory.

    The stage reads its models through the copy; `cfg` itself, which the stage saves (config.yaml,
    ldm.json), keeps the paths as the user gave them. Empty keys, preset names and directories are
    left as they are, and so is a key under a section the config leaves out (None)."""
    resolved = copy.deepcopy(cfg)
    for key in keys:
        *sections, name = key.split(".")
        holder = resolved
        for section in sections:
            holder = getattr(holder, section)
        if holder is not None and (value := getattr(holder, name)) and is_single_file(value):
            setattr(holder, name, str(imported_dir(value)))
    return resolved


def imported_dir(path: str | os.PathLike) -> Path:
    """The pipeline directory a single-file checkpoint is imported to, importing it on first use."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{IMPORT_VERSION}:{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "single-file" / f"{path.stem}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_dir():  # another process may have imported it while this one waited
            print(f"importing {path} into {target} (once; later runs read the directory)", flush=True)
            partial = target.with_name(f"{target.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            export.import_single_file(path, out_dir=partial)
            replace_dir(partial, target)
    return target
