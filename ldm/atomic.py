"""Atomic writes: a reader finds the old file (or directory) or the new one, whole, never half of
one, after a kill, a full disk or a power cut.

A file is written under a temporary name in its own directory (a rename is atomic only within one
file system), flushed to disk, renamed over the final name with `os.replace`, and then the
directory is flushed, so that the rename itself survives a power cut. A directory is built by its
writer under a temporary name, then `replace_dir` flushes every file in it and renames it into
place. Every writer of a stage artifact goes through here: resumable checkpoints, the latent
cache's shards and manifest, the pipeline record, single-file exports and imports.

Temporary files are named `.tmp-<pid>-<name>`, so a writer that owns a directory can remove what a
killed process left (`TMP_GLOB`); temporary directories are named by their writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

TMP_GLOB = ".tmp-*"  # what a killed writer may leave beside its files


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: beside it, hidden, per process."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write by any means (safetensors'
    save_file, PIL's save, ...); when the block ends without error, the file is flushed and renamed
    to `path`; on an error it is removed, and `path` is left as it was."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)  # important: atomic; a reader never sees half a file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str: as UTF-8) to `path` atomically (module docstring); returns the path.

    Through open(), so the file's mode follows the umask (a cache on shared storage must be
    readable by the other users of the cluster)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return path


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Flush the finished directory `new` and rename it to `final`. An existing `final` (the same
    checkpoint saved again) is moved aside by a rename first, and deleted after, so a kill leaves
    no long window without it, as a recursive delete would."""
    new, final = Path(new), Path(final)
    fsync_tree(new)
    aside = final.with_name(f".old-{final.name}")
    if final.exists():
        os.replace(final, aside)
    os.replace(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return final


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(path: Path) -> None:
    """Flush a directory's files and entries to disk, so a power cut after its rename cannot leave
    a directory that has its marker file but not its data."""
    for f in path.rglob("*"):
        if f.is_file():
            fsync_file(f)
    for d in [*(p for p in path.rglob("*") if p.is_dir()), path]:
        fsync_dir(d)


def fsync_dir(path: Path) -> None:
    """Make the renames and new entries inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
