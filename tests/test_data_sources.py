"""Sources and the data check: every bad input counted exactly, every odd one converted right."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

from fixtures_baddata import (LATIN1_CAPTION, MAX_PIXELS, MISSING, ORPHAN, RESOLUTION, bad_files, expected_counts,
                              noise_rgb, png, tar_add, write_bad_folder)
from ldm.config import ConfigError, validate
from ldm.data.check import check_source, main
from ldm.data.sources import DataReport, SizedSource, SourceConfig, load_image, open_source
from ldm.data.transforms import TransformConfig


def folder_cfg(path, **kw) -> SourceConfig:
    return SourceConfig(kind="imagefolder", path=str(path), max_pixels=MAX_PIXELS, **kw)


def records_by_id(source) -> dict:
    return {r.id: r for r in source}


# ----------------------------------------------------------------------------- the bad-data fixture


@pytest.mark.parametrize("captions", ["sidecar", "jsonl", "csv"])
@pytest.mark.parametrize("small_policy", ["skip", "upscale"])
def test_check_counts_every_bad_input_exactly(tmp_path, captions, small_policy):
    root = write_bad_folder(tmp_path / "data", captions)
    report = check_source(folder_cfg(root), TransformConfig(resolution=RESOLUTION, small_policy=small_policy),
                          progress=False)
    expected = expected_counts(small_policy, metadata=captions != "sidecar")
    assert dict(report.counts) == expected
    not_yielded = {"truncated", "not_an_image", "orphan_caption", "decompression_bomb", "too_small_skipped", "unreadable"}
    assert report.skipped == sum(n for k, n in expected.items() if k in not_yielded)
    assert report.examples["truncated"] == ["truncated.jpg", "truncated_b.png"]
    assert report.examples["orphan_caption"] == [ORPHAN]
    if captions != "sidecar":
        assert report.examples["unreadable"] == [MISSING]


def test_records_are_converted_by_the_policy(tmp_path):
    root = write_bad_folder(tmp_path / "data", "jsonl")
    records = records_by_id(open_source(folder_cfg(root)))
    assert all(r.image.mode == "RGB" and r.size == r.image.size for r in records.values())

    def pixel(name, x, y):
        return records[name].image.getpixel((x, y))

    for name in ("rgba.png", "la.png", "palette.png"):  # transparent left half -> white
        assert pixel(name, 2, 2) == (255, 255, 255), name
    assert pixel("rgba.png", 20, 2) == (0, 0, 200)
    assert pixel("palette.png", 20, 2) == (0, 160, 0)
    assert [pixel("gray16.png", x, 0) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    r, g, b = pixel("cmyk.jpg", 12, 12)
    assert r > 200 and g < 60 and b < 60
    upright = np.asarray(records["exif.jpg"].image).astype(int)
    assert records["exif.jpg"].size == (24, 32)  # stored 32x24, EXIF says turn it
    assert upright[:12, :, 0].mean() > 200 and upright[:12, :, 2].mean() < 50  # red on top
    assert upright[-12:, :, 2].mean() > 200 and upright[-12:, :, 0].mean() < 50
    assert records["good.png"].captions == ["a good image", "a fine image"]
    assert records["latin1.png"].captions == [LATIN1_CAPTION.decode("utf-8", errors="replace")]
    assert "\ufffd" in records["latin1.png"].captions[0]
    assert records["nocap.png"].captions == [""] and records["empty.png"].captions == [""]
    assert "tiny.png" in records  # no transform: sizes are not judged


def test_no_caption_skip_drops_missing_and_empty(tmp_path):
    root = write_bad_folder(tmp_path / "data", "sidecar")
    report = DataReport()
    ids = set(records_by_id(open_source(folder_cfg(root, no_caption="skip"), report)))
    assert "nocap.png" not in ids and "empty.png" not in ids
    assert report.counts["ok"] == 11 - 2 + 1  # tiny is kept without a transform
    assert report.counts["missing_caption"] == report.counts["empty_caption"] == 1


def test_decoded_images_and_pil_bomb_limit():
    report = DataReport()
    assert load_image(Image.new("RGB", (50, 50)), "big", report, max_pixels=2000) is None
    assert load_image(Image.new("F", (4, 4)), "float", report) is None
    gray16_i = Image.fromarray(np.full((4, 4), 65535, dtype=np.int32))  # mode "I" holding 16-bit values
    assert load_image(gray16_i, "i32", report).getpixel((0, 0)) == (255, 255, 255)
    assert dict(report.counts) == {"decompression_bomb": 1, "unsupported_mode": 1, "converted_16bit": 1}


def test_report_merge_round_trip_and_summary(tmp_path):
    root = write_bad_folder(tmp_path / "data", "sidecar")
    whole = check_source(folder_cfg(root), progress=False)
    parts = []
    for rank in range(3):
        part = DataReport()
        list(open_source(folder_cfg(root), part).shard(rank, 3))
        parts.append(DataReport.from_dict(json.loads(json.dumps(part.to_dict()))))
    merged = DataReport()
    for part in parts:
        merged.merge(part)
    assert merged.counts == whole.counts and merged.skipped == whole.skipped
    text = whole.summary()
    assert f"{whole.counts['ok']} usable" in text and "truncated.jpg" in text and "decompression_bomb" in text


def test_shards_are_disjoint_and_cover_everything(tmp_path):
    root = write_bad_folder(tmp_path / "data", "sidecar")
    source = open_source(folder_cfg(root))
    assert isinstance(source, SizedSource)
    everything = [r.id for r in source]
    parts = [[r.id for r in source.shard(rank, 4)] for rank in range(4)]
    assert sorted(sum(parts, [])) == sorted(everything)
    assert sum(len(source.shard(rank, 4)) for rank in range(4)) == len(source)
    finer = [[r.id for r in source.shard(rank, 2).shard(sub, 2)] for rank in range(2) for sub in range(2)]
    assert sorted(sum(finer, [])) == sorted(everything)
    assert [r.id for r in source] == everything  # deterministic order
    with pytest.raises(ValueError, match="rank 4"):
        source.shard(4, 4)


def test_metadata_errors_name_the_problem(tmp_path):
    (tmp_path / "a.png").write_bytes(png(noise_rgb()))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match="no caption column 'text' or 'caption'.*prompt"):
        open_source(folder_cfg(tmp_path))
    assert next(iter(open_source(folder_cfg(tmp_path, caption_column="prompt")))).captions == ["x"]
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,y\n")
    with pytest.raises(ConfigError, match="both metadata.jsonl and metadata.csv"):
        open_source(folder_cfg(tmp_path))
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file,caption\na.png,y\n")
    with pytest.raises(ConfigError, match=r"metadata.csv:2: a row needs a file_name"):
        open_source(folder_cfg(tmp_path))
    (tmp_path / "metadata.csv").write_bytes(b"file_name,caption\na.png,caf\xe9\n")
    with pytest.raises(ConfigError, match="metadata.csv is not UTF-8"):
        open_source(folder_cfg(tmp_path))


def test_config_validation():
    with pytest.raises(ConfigError, match="path is required"):
        validate(SourceConfig(kind="imagefolder"))
    with pytest.raises(ConfigError, match="seed: only for kind 'shapes'"):
        validate(SourceConfig(kind="hf", path="x", seed=3))


# ----------------------------------------------------------------------------- datasets, webdataset


def write_hf(path, split_dict: bool = False):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": png(noise_rgb(seed=i)), "path": None} for i in range(4)]
                     + [{"bytes": b"not an image at all", "path": None}],
            "caption": ["zero", "one", "two", None, "four"]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    (datasets.DatasetDict({"train": ds, "test": ds.select([0])}) if split_dict else ds).save_to_disk(str(path))


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_from_disk(tmp_path, streaming):
    write_hf(tmp_path / "ds")
    report = DataReport()
    source = open_source(SourceConfig(kind="hf", path=str(tmp_path / "ds"), streaming=streaming), report)
    records = list(source)
    assert [r.captions for r in records] == [["zero"], ["one"], ["two"], [""]]  # "caption" column found
    assert records[0].image.tobytes() == noise_rgb(seed=0).tobytes()
    assert dict(report.counts) == {"ok": 4, "missing_caption": 1, "not_an_image": 1}
    assert isinstance(source, SizedSource) != streaming
    assert [r.id for r in source.shard(1, 2)] == ["1", "3"]


def test_hf_split_and_columns(tmp_path):
    write_hf(tmp_path / "dd", split_dict=True)
    test = list(open_source(SourceConfig(kind="hf", path=str(tmp_path / "dd"), split="test")))
    assert [r.captions for r in test] == [["zero"]]
    with pytest.raises(ConfigError, match="no split 'val'.*train, test"):
        open_source(SourceConfig(kind="hf", path=str(tmp_path / "dd"), split="val"))
    with pytest.raises(ConfigError, match="no image column 'img'"):
        open_source(SourceConfig(kind="hf", path=str(tmp_path / "dd"), image_column="img"))


def test_webdataset_tars_with_corrupt_member_and_cut_shard(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        tar_add(tar, "000.jpg", png(noise_rgb(seed=0)))  # content decides the format, not the name
        tar_add(tar, "000.txt", b"first")
        tar_add(tar, "sub/001.png", png(noise_rgb(seed=1)))
        tar_add(tar, "sub/001.json", json.dumps({"text": "second"}).encode())
        tar_add(tar, "002.jpg", b"\xff\xd8 corrupt member")
        tar_add(tar, "002.txt", b"third")
        tar_add(tar, "003.txt", b"caption only")
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        tar_add(tar, "100.png", png(noise_rgb(seed=2)))
        tar_add(tar, "100.txt", b"kept before the cut")
        tar_add(tar, "101.png", png(noise_rgb(seed=3)))
    whole.seek(0)
    with tarfile.open(fileobj=whole) as tar:
        cut = tar.getmember("101.png").offset_data + 100
    (tmp_path / "shard-001.tar").write_bytes(whole.getvalue()[:cut])  # ends inside 101.png
    report = DataReport()
    records = list(open_source(SourceConfig(kind="webdataset", path=str(tmp_path)), report))
    assert [(r.id, r.captions) for r in records] == [
        ("shard-000.tar/000", ["first"]), ("shard-000.tar/sub/001", ["second"]),
        ("shard-001.tar/100", ["kept before the cut"])]
    assert dict(report.counts) == {"ok": 3, "not_an_image": 1, "orphan_caption": 1, "truncated": 1, "unreadable": 1}
    assert report.examples["not_an_image"] == ["shard-000.tar/002"]
    assert report.examples["truncated"] == ["shard-001.tar/101"]
    assert report.examples["unreadable"] == ["shard-001.tar:<rest of the shard>"]


# ----------------------------------------------------------------------------- the command


def test_check_command(tmp_path, capsys):
    root = write_bad_folder(tmp_path / "data", "sidecar")
    argv = ["--kind", "imagefolder", "--path", str(root), "--max-pixels", str(MAX_PIXELS),
            "--resolution", str(RESOLUTION), "--small-policy", "skip", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "11 usable" in out and "too_small_skipped" in out and "tiny.png" in out

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": {"source": {"kind": "imagefolder", "path": str(root)},
                                                 "transform": {"resolution": RESOLUTION}}, "train": {"lr": 1}}))
    assert main(["--config", str(cfg_file), "--max-pixels", str(MAX_PIXELS), "--quiet"]) == 0
    assert "too_small_upscaled" in capsys.readouterr().out

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "random.png").write_bytes(bad_files()["random.png"][0])
    assert main(["--kind", "imagefolder", "--path", str(only_bad), "--quiet"]) == 1
    assert main(["--kind", "imagefolder", "--quiet"]) == 2
    assert "path is required" in capsys.readouterr().err


def test_sources_pickle_for_spawned_workers(tmp_path):
    write_hf(tmp_path / "ds")
    root = write_bad_folder(tmp_path / "data", "sidecar")
    for cfg in (SourceConfig(kind="hf", path=str(tmp_path / "ds")), folder_cfg(root),
                SourceConfig(kind="shapes", size=3, resolution=8)):
        source = open_source(cfg).shard(0, 2)
        clone = pickle.loads(pickle.dumps(source))
        assert [r.id for r in clone] == [r.id for r in source]


def test_hf_local_data_dir_streams_without_a_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # its lock files stay here
    write_hf(tmp_path / "saved")
    (tmp_path / "parquet").mkdir()
    datasets.load_from_disk(str(tmp_path / "saved")).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    report = DataReport()
    source = open_source(SourceConfig(kind="hf", path=str(tmp_path / "parquet"), streaming=True), report)
    assert [r.captions for r in source] == [["zero"], ["one"], ["two"], [""]]
    assert dict(report.counts) == {"ok": 4, "missing_caption": 1, "not_an_image": 1}
