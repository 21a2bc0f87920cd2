"""A single-file Stable Diffusion checkpoint wherever a diffusers directory is expected.

Encoding and training read their models from diffusers directories: `vae=` and `text.encoder=`
of stages 2 and 3, `model.pretrained=` of stages 1 and 3. Most Stable Diffusion models are
shared as one `.safetensors` file in the original layout instead (A1111's, ComfyUI's, or ours
from `infer.py --export-single-file`), so each of these keys takes such a file as well.

The file is imported once (`ldm.export.import_single_file`) into a pipeline directory under the
import cache, `$LDM_CACHE/single-file/<stem>-<key>/` (default `~/.cache/ldm`), keyed by the
file's absolute path, size and modification time; every later read, from any stage or process,
takes that directory. The import is built beside it and renamed into place, under a file lock,
so concurrent processes import it once and nobody reads a half-written directory. Configs keep
the file's path, which is what the user gave.

A pickled checkpoint (.ckpt) can run code when loaded, so it is not imported behind the user's
back: `infer.py MODEL.ckpt --allow-pickle --export-diffusers DIR` converts it once, explicitly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from filelock import FileLock

SUFFIX = ".safetensors"
PICKLED = (".ckpt", ".pt", ".pth", ".bin")
IMPORT_VERSION = 1  # part of the key: a change to the importer imports every file afresh


def cache_root() -> Path:
    return Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm")


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


def model_dir(path: str | os.PathLike) -> Path:
    """The diffusers directory to read `path` from: itself, or where its single file is imported."""
    path = Path(path)
    return imported_dir(path) if is_single_file(path) else path


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
            from ldm.export import import_single_file

            print(f"importing {path} into {target} (once; later runs read the directory)", flush=True)
            partial = target.with_name(f"{target.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            import_single_file(path, out_dir=partial)
            os.replace(partial, target)
    return target
