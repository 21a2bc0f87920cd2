"""The pipeline record (ldm.pipeline: ldm.json) and the single file's header (ldm.export): one
writer, one reader each, and the reader names the file and the key it cannot read. No models:
these read JSON and safetensors headers only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.export import carried_files, single_file_configs
from ldm.infer import _ldm_record
from ldm.pipeline import (FORMAT, VERSION, PipelineFormatError, read_record, record_from_files, require_pipeline_dir,
                          save_pipeline, write_ldm_files)


class SavedPipeline:
    """Stands in for a StableDiffusionPipeline: save_pipeline calls save_pretrained, then writes the record."""

    def save_pretrained(self, path, safe_serialization: bool):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model_index.json").write_text("{}")


def test_the_record_round_trips_with_its_format_and_version(tmp_path):
    path = save_pipeline(SavedPipeline(), tmp_path / "pipeline", {"clip_skip": 2, "objective": "flow"})
    record = read_record(path)
    assert record == {"format": FORMAT, "version": VERSION, "clip_skip": 2, "objective": "flow"}
    assert list(record)[:2] == ["format", "version"]  # first in the file, as before
    assert require_pipeline_dir(path) == path and not list(path.glob(".tmp-*"))


def test_a_record_without_version_reads_as_version_1_and_a_directory_without_one_as_empty(tmp_path):
    (tmp_path / "ldm.json").write_text(json.dumps({"clip_skip": 1}))  # hand-written, or from before versions
    assert read_record(tmp_path) == {"clip_skip": 1}
    assert read_record(tmp_path / "elsewhere") == {}  # any SD diffusers directory: no record


@pytest.mark.parametrize(("record", "message"), [
    ({"format": FORMAT, "version": 2}, "key 'version' is 2; this ldm reads ldm-pipeline version 1"),
    ({"format": "something-else", "version": 1}, "key 'format' is 'something-else'; expected 'ldm-pipeline'"),
])
def test_an_unknown_format_or_version_names_the_file_and_the_key(tmp_path, record, message):
    (tmp_path / "ldm.json").write_text(json.dumps(record))
    with pytest.raises(PipelineFormatError, match=f"{tmp_path / 'ldm.json'}: {message}"):
        read_record(tmp_path)
    with pytest.raises(PipelineFormatError, match=f"{tmp_path / 'ldm.json'}: {message}"):
        _ldm_record(tmp_path)  # load_pipeline's reader is this one
    with pytest.raises(PipelineFormatError, match=r"model\.safetensors \(ldm\.json inside\): key"):
        record_from_files({"ldm.json": json.dumps(record)}, "model.safetensors")


def test_broken_json_and_a_missing_index_name_the_file(tmp_path):
    (tmp_path / "ldm.json").write_text("{not json")
    with pytest.raises(PipelineFormatError, match=f"{tmp_path / 'ldm.json'}: not JSON"):
        read_record(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a diffusers pipeline directory .no model_index.json."):
        require_pipeline_dir(tmp_path)


def test_carried_files_must_be_bare_ldm_json_names(tmp_path):
    write_ldm_files(tmp_path, {"ldm.json": "{}", "ldm_train.json": "[]"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ldm.json", "ldm_train.json"]
    for bad in ("../ldm.json", "config.json"):
        with pytest.raises(ValueError, match="expected a bare ldm\\*.json name"):
            write_ldm_files(tmp_path, {bad: "{}"})


def single_file(path: Path, metadata: dict[str, str]) -> Path:
    save_file({"model.diffusion_model.x": torch.zeros(1)}, path, metadata=metadata)
    return path


def test_the_single_files_header_names_the_file_and_the_key(tmp_path):
    newer = single_file(tmp_path / "newer.safetensors", {"ldm.format": "2"})
    with pytest.raises(ValueError, match=rf"{newer}: metadata key 'ldm.format' is '2'; this version of ldm reads '1'"):
        single_file_configs(newer)
    partial = single_file(tmp_path / "partial.safetensors", {"ldm.format": "1", "ldm.unet": "{}"})
    with pytest.raises(ValueError, match=rf"{partial}: metadata key 'ldm.vae' is missing"):
        single_file_configs(partial)
    record = {"format": FORMAT, "version": 1, "clip_skip": 2}
    carrying = single_file(tmp_path / "ours.safetensors", {"ldm.file.ldm.json": json.dumps(record)})
    assert carried_files(carrying) == {"ldm.json": json.dumps(record)}
    assert _ldm_record(carrying) == record
    assert _ldm_record(single_file(tmp_path / "theirs.safetensors", {})) == {}
