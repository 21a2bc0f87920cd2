"""The pipeline directory, stage 3's artifact: what `diffusers.StableDiffusionPipeline.from_pretrained`
loads as it is, plus `ldm.json`, the record of how the model was trained.

Layout:

    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
                  StableDiffusionPipeline.save_pretrained (safetensors); the scheduler is the sampler
                  saved as the default, configured with the training schedule
    ldm.json      {"format": "ldm-pipeline", "version": 1, ...}: objective, caption_dropout, noise,
                  clip_skip, training_scheduler (the exact training schedule), latent_size and
                  image_size (the most common training size), fine_tuned_from, lora, ema_decay,
                  validation, split (the held-out set), train_config (the resolved stage config).
                  Readers take what they need with .get(): every key but the first two is optional
    ldm*.json     any file of that name at the root travels with the weights into a single-file
                  export (`ldm.export`, as metadata) and back out of its import

Versions of ldm.json: 1 is the only one. A record without `format` or `version` (hand-written,
or written before they were checked) reads as version 1; another format or version is an error
that names the file and the key.

This module is the one writer (`save_pipeline`) and the one reader (`load_pipeline_dir` for the
weights, `read_record` for ldm.json, and `record_from_files` for the copy a single file carries);
`ldm_files` and `write_ldm_files` carry the `ldm*.json` files' text through single files unread.
"""

from __future__ import annotations

import json
import os
from fnmatch import fnmatch
from pathlib import Path

from ldm.atomic import write_atomic

FORMAT = "ldm-pipeline"
VERSION = 1
RECORD = "ldm.json"
LDM_FILES = "ldm*.json"  # files at a pipeline dir's root that travel with the weights
INDEX = "model_index.json"  # diffusers' file that makes a directory a pipeline


class PipelineFormatError(ValueError):
    """A pipeline directory's record that this version of ldm cannot read."""


def save_pipeline(pipe, path: str | os.PathLike, record: dict) -> Path:
    """Save the StableDiffusionPipeline `pipe` (safetensors) and its training `record` as ldm.json."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    write_atomic(path / RECORD, json.dumps({"format": FORMAT, "version": VERSION, **record}, indent=2))
    return path


def require_pipeline_dir(path: str | os.PathLike) -> Path:
    """`path`, a diffusers pipeline directory; else FileNotFoundError naming the file it lacks."""
    path = Path(path)
    if not (path / INDEX).is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no {INDEX})")
    return path


def load_pipeline_dir(path: str | os.PathLike, **kwargs):
    """The StableDiffusionPipeline saved at `path` (never from the hub); `kwargs` go to
    `from_pretrained` (e.g. use_safetensors=True). A directory without model_index.json is an
    error naming it."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(require_pipeline_dir(path), local_files_only=True, **kwargs)


def read_record(path: str | os.PathLike) -> dict:
    """The ldm.json of the pipeline directory `path`, checked (module docstring); {} for a
    directory without one (any Stable Diffusion diffusers directory)."""
    file = Path(path) / RECORD
    return parse_record(file.read_text(), str(file)) if file.is_file() else {}


def record_from_files(files: dict[str, str], where: str | os.PathLike) -> dict:
    """ldm.json from the `ldm*.json` files a single file `where` carries (`ldm.export`), checked;
    {} when it carries none."""
    text = files.get(RECORD)
    return parse_record(text, f"{where} ({RECORD} inside)") if text is not None else {}


def parse_record(text: str, where: str) -> dict:
    """The record in `text` (read from `where`, which errors name), checked."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineFormatError(f"{where}: not JSON ({err})") from None
    if not isinstance(record, dict):
        raise PipelineFormatError(f"{where}: expected a JSON object, found {type(record).__name__}")
    found = record.get("format", FORMAT)
    if found != FORMAT:
        raise PipelineFormatError(f"{where}: key 'format' is {found!r}; expected {FORMAT!r}")
    version = record.get("version", 1)  # before versions were checked, a record could lack it: that is 1
    if version != VERSION:
        raise PipelineFormatError(f"{where}: key 'version' is {version!r}; this ldm reads {FORMAT} version "
                                  f"{VERSION} (written by another version of ldm: use that one, or retrain)")
    return record


def ldm_files(pipeline_dir: str | os.PathLike) -> dict[str, str]:
    """The text of each `ldm*.json` file at the root of `pipeline_dir`, by name."""
    return {p.name: p.read_text() for p in sorted(Path(pipeline_dir).glob(LDM_FILES)) if p.is_file()}


def check_ldm_file_name(name: str) -> None:
    """A carried file's name must be a bare `ldm*.json`: never a path outside the directory."""
    if Path(name).name != name or not fnmatch(name, LDM_FILES):
        raise ValueError(f"metadata names a file {name!r}; expected a bare {LDM_FILES} name")


def write_ldm_files(out_dir: str | os.PathLike, files: dict[str, str]) -> None:
    """Write carried `ldm*.json` files (from `ldm_files`) at the root of `out_dir`."""
    for name, text in files.items():
        check_ldm_file_name(name)
        write_atomic(Path(out_dir) / name, text)
