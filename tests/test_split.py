"""The held-out split (ldm.data.split): chosen by a hash of each record's key, not its position.

Fixed by the keys alone (not their order, not the number of processes), representative of a
folder sorted by category, disjoint from training, the same set a prepared folder's heldout.txt
names, and recorded (rule, count, hash of the keys) where the figures are written.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.config import ConfigError, load_config
from ldm.data.images import DataConfig, load_images, plan_split
from ldm.data.sources import SourceConfig
from ldm.data.split import SPLIT_RULE, heldout_by_count, key_hash, keys_digest
from ldm.data.transforms import TransformConfig

CATEGORIES = ("animals", "flags", "food", "symbols")


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, (value * 7) % 256, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def write_sorted_folder(root: Path, per_category: int = 30) -> list[str]:
    """A folder sorted by category (as an emoji folder is), captions in metadata.jsonl; returns the keys."""
    keys = []
    for c, category in enumerate(CATEGORIES):
        (root / category).mkdir(parents=True)
        for i in range(per_category):
            key = f"{category}/{i:03d}.png"
            (root / key).write_bytes(png_bytes(c * per_category + i))
            keys.append(key)
    rows = [json.dumps({"file_name": k, "text": f"a {k.split('/')[0]} icon"}) for k in keys]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return keys


def data_cfg(source: SourceConfig, **kw) -> DataConfig:
    cfg = DataConfig(source=source, transform=TransformConfig(resolution=8), **kw)
    cfg.validate()
    return cfg


def folder(root: Path, **kw) -> DataConfig:
    return data_cfg(SourceConfig(kind="imagefolder", path=str(root)), **kw)


def split_ids(cfg: DataConfig, split: str, rank: int = 0, world: int = 1) -> list[str]:
    return load_images(cfg, split, rank, world, desc="").ids


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("emoji")
    return root, write_sorted_folder(root)


# ----------------------------------------------------------------------------- the rule


def test_the_hash_is_pinned_so_every_machine_draws_the_same_split():
    # SHA-256 of the UTF-8 key, not Python's salted hash(): these numbers hold on every machine and run
    assert key_hash("animals/000.png") == int("12aa29a5ad89f9ba", 16) / 2**64
    assert keys_digest(["b", "a", "a"]) == "911169ddaaf146aff539f58c26c489af3b892dff0fe283c1c264c65ae5aa59a2"
    keys = [f"{i}.png" for i in range(200)]
    picked = heldout_by_count(keys, 20)
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    assert heldout_by_count(shuffled, 20) == picked and len(picked) == 20
    assert heldout_by_count(keys, 10) < picked  # nested: a smaller count holds out a subset


def test_sorted_folder_holds_out_every_category_in_proportion(sorted_folder):
    root, keys = sorted_folder
    heldout = plan_split(folder(root, eval_size=40)).keys
    assert len(heldout) == 40
    counts = np.array([sum(k.startswith(c + "/") for k in heldout) for c in CATEGORIES])
    # The last-40 rule gave [0, 0, 10, 30]. Under a uniform draw of 40 from 4 x 30, each count is
    # hypergeometric (mean 10, sd ~2.4); chi-square over the 4 categories below its 0.1% point (16.3).
    expected = 40 / len(CATEGORIES)
    assert ((counts - expected) ** 2 / expected).sum() < 16.3, counts
    assert counts.min() > 0


def test_no_key_is_in_both_splits_and_the_splits_cover_the_folder(sorted_folder):
    root, keys = sorted_folder
    for cfg in (folder(root, eval_size=12), folder(root, eval_fraction=0.25)):
        train, held = split_ids(cfg, "train"), split_ids(cfg, "eval")
        assert not set(train) & set(held)
        assert sorted(train + held) == sorted(keys)
        assert set(held) == set(plan_split(cfg).keys)
    assert len(split_ids(folder(root, eval_size=12), "eval")) == 12
    assert 0.1 < len(split_ids(folder(root, eval_fraction=0.25), "eval")) / len(keys) < 0.4


def test_split_is_equal_across_one_and_two_processes(sorted_folder):
    root, _ = sorted_folder
    cfg = folder(root, eval_size=16)
    for split in ("train", "eval"):
        whole = split_ids(cfg, split)
        parts = [split_ids(cfg, split, rank, 2) for rank in range(2)]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(whole)


def test_max_images_limits_training_only(sorted_folder):
    root, _ = sorted_folder
    cfg = folder(root, eval_size=16, max_images=10)
    assert len(split_ids(cfg, "train")) == 10 and len(split_ids(cfg, "eval")) == 16


# ----------------------------------------------------------------------------- order, tars, streams


def write_tar(path: Path, keys: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("png", png_bytes(len(key))), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_split_is_unchanged_by_shuffling_the_records(tmp_path):
    keys = [f"sample{i:03d}" for i in range(60)]
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tar(tmp_path / "a" / "data-000.tar", keys)
    # the same samples in another order, cut into other shards: the held-out __key__s do not change
    write_tar(tmp_path / "b" / "part-000.tar", shuffled[:25])
    write_tar(tmp_path / "b" / "part-001.tar", shuffled[25:])
    held = [{rid.split("/", 1)[1] for rid in split_ids(data_cfg(SourceConfig(kind="webdataset", path=str(tmp_path / d)),
                                                                 eval_size=9), "eval")} for d in "ab"]
    assert held[0] == held[1] == heldout_by_count(keys, 9)


def test_streams_hold_out_by_fraction_and_refuse_a_count(tmp_path):
    import datasets

    rows = {"image": [{"bytes": png_bytes(i), "path": None} for i in range(40)], "text": [f"c{i}" for i in range(40)]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    table, stream = (SourceConfig(kind="hf", path=str(tmp_path / "ds"), streaming=s) for s in (False, True))
    # a stream decides each record as it passes: the same held-out rows as the table, and the same record
    by_table, by_stream = (load_images(data_cfg(s, eval_fraction=0.3), "eval", desc="") for s in (table, stream))
    assert by_table.ids == by_stream.ids and 0 < len(by_stream) < 40
    assert by_stream.split == by_table.split
    assert by_stream.split["count"] == len(by_stream) and by_stream.split["rule"] == SPLIT_RULE
    assert set(split_ids(data_cfg(stream, eval_fraction=0.3), "train")).isdisjoint(by_stream.ids)
    with pytest.raises(ConfigError, match="stream of unknown length.*eval_fraction"):
        plan_split(data_cfg(stream, eval_size=5))
    with pytest.raises(ConfigError, match=r"eval_size=64 \(the default\)"):
        plan_split(data_cfg(stream))
    # a list on a stream: the rows it names are held out, and one the stream never had is an error at its end
    (tmp_path / "rows.txt").write_text("3\n17\n")
    assert split_ids(data_cfg(stream, heldout=str(tmp_path / "rows.txt")), "eval") == ["3", "17"]
    (tmp_path / "rows.txt").write_text("3\n99\n")
    with pytest.raises(ConfigError, match=r"rows\.txt names 1 key.*99"):
        split_ids(data_cfg(stream, heldout=str(tmp_path / "rows.txt")), "eval")


# ----------------------------------------------------------------------------- explicit held-out sets


def test_eval_size_picks_the_set_a_prepared_folders_heldout_txt_names(tmp_path):
    root = tmp_path / "prepared"
    keys = write_sorted_folder(root, per_category=10)
    (root / "heldout.txt").write_text("".join(f"{k}\n" for k in sorted(heldout_by_count(keys, 7))))
    (root / "README.md").write_text("not an image, and never held out")
    listed = set((root / "heldout.txt").read_text().split())
    assert set(split_ids(folder(root, eval_size=7), "eval")) == listed
    assert set(split_ids(folder(root, heldout=str(root / "heldout.txt")), "eval")) == listed
    assert plan_split(folder(root, eval_size=7)).record()["keys_sha256"] == keys_digest(listed)


def test_heldout_list_naming_an_unknown_key_is_an_error_naming_the_file(sorted_folder, tmp_path):
    root, keys = sorted_folder
    listing = tmp_path / "val.txt"
    listing.write_text(f"{keys[0]}\nanimals/missing.png\n")
    with pytest.raises(ConfigError, match=r"val\.txt names 1 key.*animals/missing\.png"):
        plan_split(folder(root, heldout=str(listing)))


def test_heldout_folder_inside_or_beside_the_source(tmp_path):
    root = tmp_path / "data"
    keys = write_sorted_folder(root, per_category=5)
    inside = folder(root, heldout=str(root / "food"))
    assert sorted(split_ids(inside, "eval")) == [k for k in keys if k.startswith("food/")]
    assert not any(k.startswith("food/") for k in split_ids(inside, "train"))
    beside = tmp_path / "val"
    beside.mkdir()
    for i in range(3):
        (beside / f"v{i}.png").write_bytes(png_bytes(100 + i))
    apart = folder(root, heldout=str(beside))
    assert split_ids(apart, "eval") == ["v0.png", "v1.png", "v2.png"]
    assert sorted(split_ids(apart, "train")) == sorted(keys)
    assert plan_split(apart).record()["count"] == 3


@pytest.mark.parametrize(("overrides", "names"), [
    (["data.eval_size=10", "data.eval_fraction=0.1"], "data.eval_size and data.eval_fraction"),
    (["data.eval_size=10", "data.heldout=val.txt"], "data.eval_size and data.heldout"),
    (["data.eval_fraction=1.5"], "data.eval_fraction must be in"),
])
def test_conflicting_split_settings_are_refused(overrides, names):
    from ldm.train.encode import EncodeConfig

    with pytest.raises(ConfigError, match=names):
        load_config(EncodeConfig, None, ["data.source.kind=imagefolder", "data.source.path=x", *overrides])


def test_default_count_and_fraction_alone_are_accepted():
    assert DataConfig().eval_count == 64
    cfg = data_cfg(SourceConfig(kind="imagefolder", path="x"), eval_fraction=0.1)
    assert cfg.eval_count is None


# ----------------------------------------------------------------------------- the record


def test_cache_manifest_records_the_split_and_refuses_another(sorted_folder, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from ldm.data.cache import CacheMismatchError, open_cache
    from ldm.train.encode import EncodeConfig, encode_dataset
    from ldm.models.presets import vae_config

    torch.manual_seed(0)
    AutoencoderKL(**vae_config("tiny-f4")).save_pretrained(tmp_path / "vae")
    root, _ = sorted_folder
    settings = [f"vae={tmp_path / 'vae'}", f"out_dir={tmp_path / 'latents'}", "data.source.kind=imagefolder",
                f"data.source.path={root}", "data.transform.resolution=8", "batch_size=64"]
    cfg = load_config(EncodeConfig, None, [*settings, "data.eval_size=10"])
    held = open_cache(encode_dataset(cfg), "eval")
    record = held.manifest["split"]
    assert record == {"rule": SPLIT_RULE, "eval_size": 10, "count": 10, "keys_sha256": keys_digest(held.ids)}
    assert record == load_images(cfg.data, "eval", desc="").split  # what the VAE and CLIP write in eval.json
    with pytest.raises(CacheMismatchError, match="split.eval_size: cache has 10, run expects 12"):
        encode_dataset(load_config(EncodeConfig, None, [*settings, "data.eval_size=12"]))


def test_a_stage_refuses_to_evaluate_on_what_an_upstream_model_trained_on(sorted_folder, tmp_path):
    import yaml

    from ldm.data.split import covers, upstream_split_problem

    root, _ = sorted_folder
    source = {"kind": "imagefolder", "path": str(root)}
    small, large = (plan_split(folder(root, eval_size=n)).record() for n in (8, 16))
    assert covers(large, small) and covers(small, small) and not covers(small, large)
    assert not covers(large, plan_split(folder(root, eval_fraction=0.05)).record())  # cannot tell: refused
    shapes_small, shapes_large = (plan_split(DataConfig(eval_size=n)).record() for n in (8, 16))
    assert covers(shapes_small, shapes_large)  # held-out shapes come from another seed: never trained on

    run = tmp_path / "vae_run"  # what train_vae / train_clip leave: config.yaml and eval.json with `split`
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"source": source}}))
    (run / "eval.json").write_text(json.dumps({"psnr": 30.0, "split": small}))
    problem = upstream_split_problem(run, source, large, "this encode")
    assert "eval_size=16 here" in problem and "eval_size=8 in its eval.json" in problem
    assert "same data.eval_size" in problem
    assert upstream_split_problem(run, source, small, "this encode") is None
    assert upstream_split_problem(run, {**source, "path": "elsewhere"}, large, "this encode") is None  # other data
