"""Generated vs real held-out images (ldm/quality.py, issue #19): the figures, their floor and
ceiling, stage 3's in-loop evaluation and its refusal of another feature network."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fixtures_runs import latents, ldm_cfg  # noqa: F401  (fixture)
from ldm.config import ConfigError, load_config
from ldm.data.images import DataConfig, load_images
from ldm.data.sources import SourceConfig
from ldm.metrics import IncomparableMetricsError
from ldm.quality import (FeatureNetwork, QualityEval, data_config_of_cache, default_features, load_feature_network,
                         real_images)
from ldm.train.clip import ClipTrainConfig, train_clip

CLIP = ["data.source.size=64", "data.source.resolution=16", "data.transform.resolution=16", "data.eval_size=8",
        "retrieval_candidates=8", "model.embed_dim=32", "model.image_width=32", "model.image_layers=1",
        "model.image_head_width=16", "model.patch_size=8", "model.text_width=32", "model.text_layers=1",
        "model.text_heads=2", "train.steps=20", "train.batch_size=32", "train.lr=0.003", "train.log_every=10"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP trained by train_clip.py for 20 steps on 16 px shapes."""
    out = tmp_path_factory.mktemp("clip")
    train_clip(load_config(ClipTrainConfig, None, [f"out_dir={out}", *CLIP]))
    return out


@pytest.fixture(scope="module")
def shapes_sets():
    """32 held-out and 32 training shapes at 16 px, with captions."""
    data = DataConfig(source=SourceConfig(kind="shapes", size=64, resolution=16), eval_size=32)
    data.transform.resolution = 16
    return real_images(data, 32)


def test_identical_images_reach_the_floor_and_ceiling_and_noise_does_not(clip_dir, shapes_sets):
    held_out, captions, reference = shapes_sets
    network = load_feature_network(f"clip:{clip_dir}")
    assert network.identity.startswith(f"clip:{clip_dir}@") and len(network.identity.rpartition("@")[2]) == 8
    quality = QualityEval(network, held_out, captions, reference, resamples=50)
    assert quality.prompts == captions and len(set(quality.seeds)) == 32
    same = quality(held_out)
    noise = quality(torch.rand(held_out.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["kid"] < noise["kid"]  # (unbiased KID: < 0 on equal sets)
    assert same["top1"] == same["top1_ceiling"] and same["mean_rank"] == same["mean_rank_ceiling"]
    assert noise["fid"] > same["fid_floor"] > 0 and noise["kid"] > same["kid_floor"]
    assert noise["fid_lo"] <= noise["fid"] <= noise["fid_hi"] and noise["top1_lo"] <= noise["top1"] <= noise["top1_hi"]
    assert same["top1_chance"] == pytest.approx(1 / same["candidates"]) and same["candidates"] <= 32
    assert noise["features"] == network.identity and noise["n"] == 32
    assert quality(held_out) == same  # fixed seeds and resamples: the same images give the same figures
    items = quality.item_ranks(held_out)  # per caption: the real images' own ranks, twice
    assert [i["caption"] for i in items] == captions and all(i["rank"] == i["real_rank"] >= 1 for i in items)
    assert sum(i["rank"] == 1 for i in items) / 32 == same["top1"]
    noisy = quality.item_ranks(torch.flip(held_out, [0]))  # each image under another's caption
    assert [i["real_rank"] for i in noisy] == [i["real_rank"] for i in items]
    assert sum(i["rank"] for i in noisy) > sum(i["rank"] for i in items)


def test_without_a_text_tower_or_captions_retrieval_is_skipped_and_fid_still_runs(clip_dir, shapes_sets):
    held_out, captions, reference = shapes_sets
    clip = load_feature_network(f"clip:{clip_dir}")
    notes = []
    image_only = QualityEval(FeatureNetwork("test:net@0", clip.image), held_out, captions, reference, 10, log=notes.append)
    figures = image_only(held_out)
    assert "fid" in figures and "top1" not in figures and "no text tower" in figures["retrieval_skipped"]
    assert image_only.item_ranks(held_out) == []
    uncaptioned = QualityEval(clip, held_out, [""] * 31 + ["x"], reference, 10, log=notes.append)
    assert "31 of the 32 held-out images have no caption" in uncaptioned(held_out)["retrieval_skipped"]
    assert len(notes) == 2 and all(n.startswith("quality: caption retrieval skipped") for n in notes)
    with pytest.raises(ValueError, match="at least 2 held-out and 2 training images.*has 1 held-out"):
        QualityEval(clip, held_out[:1], captions[:1], reference[:1])


def test_feature_specs(clip_dir, tmp_path):
    assert default_features(str(clip_dir)) == (f"clip:{clip_dir}", "")
    spec, why = default_features("tiny")
    assert spec == "" and "not a CLIP trained by train_clip.py" in why
    with pytest.raises(ValueError, match="no CLIP trained by train_clip.py"):
        load_feature_network(f"clip:{tmp_path}")
    with pytest.raises(ValueError, match="no Inception weights file"):
        load_feature_network(f"inception:{tmp_path / 'missing.pth'}")
    with pytest.raises(ValueError, match="not clip:<dir> or inception:<file>"):
        load_feature_network("vgg:x")


@pytest.fixture(scope="module")
def ldm_run(latents, clip_dir, tmp_path_factory):  # noqa: F811
    """A 2-step stage-3 run conditioned on the tiny CLIP's text tower, measured at steps 1 and 2."""
    from ldm.train.ldm import train_ldm

    import ldm.train.ldm as stage3

    out = tmp_path_factory.mktemp("ldm") / "run"
    calls = []

    def recording_denoise(*args, num_steps, **kwargs):
        calls.append((len(args[2]), num_steps))  # (images, sampling steps)
        return real_denoise(*args, num_steps=num_steps, **kwargs)

    real_denoise = stage3.denoise
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage3, "denoise", recording_denoise)
        train_ldm(ldm_cfg(out, latents, *LDM_QUALITY(clip_dir), "validation.quality_steps=1"))
    (out / "denoise_calls.json").write_text(json.dumps(calls))
    return out


def LDM_QUALITY(clip_dir) -> list[str]:
    return [f"text.encoder={clip_dir}", "train.steps=2", "train.eval_every=1", "train.save_every=1",
            "validation.quality_n=200", "validation.steps=2", "validation.bootstrap=20"]


def test_stage3_measures_every_eval(ldm_run, clip_dir):
    out = ldm_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "quality/fid" in r]
    assert [r["step"] for r in evals] == [1, 2]  # step 1 in the loop, step 2 at the end
    for key in ("fid_lo", "fid_hi", "fid_floor", "kid", "kid_floor", "top1", "top1_ceiling", "top1_chance", "mean_rank"):
        assert all(isinstance(r[f"quality/{key}"], float) for r in evals), key
    assert all(r["eval/seconds"] > 0 and 0 < r["eval/fraction"] < 1 for r in evals)
    assert evals[0]["quality/fid_floor"] == evals[1]["quality/fid_floor"]  # fixed across steps
    assert evals[0]["quality/n"] == 4  # quality_n=200, but the cache holds 4 held-out images
    summary = json.loads((out / "eval.json").read_text())
    assert summary["step"] == 2 and summary["n"] == 4 and summary["features"].startswith(f"clip:{clip_dir}@")
    assert summary["quality"]["fid"] == evals[1]["quality/fid"] and summary["split"]["eval_size"] == 4


def test_stage3_quality_images_use_quality_steps(ldm_run):
    calls = json.loads((ldm_run / "denoise_calls.json").read_text())
    # the 4 held-out captions at steps 1 and 2, in validation.quality_steps=1 (validation.steps=2)
    assert calls == [[4, 1], [4, 1]]


def test_stage3_resumed_with_another_n_is_refused(ldm_run, latents, clip_dir):  # noqa: F811
    from ldm.train.ldm import train_ldm

    # the same run resumed with another N: its figures would not compare with the earlier ones
    with pytest.raises(IncomparableMetricsError, match="n 2 vs 4"):
        train_ldm(ldm_cfg(ldm_run, latents, *LDM_QUALITY(clip_dir), "validation.quality_n=2"))


def _folder(root, n: int, captions: bool):
    """n shapes images at 16 px as PNG files, with metadata.jsonl captions or none."""
    data = DataConfig(source=SourceConfig(kind="shapes", size=n, resolution=16), eval_size=0)
    data.transform.resolution = 16
    store = load_images(data, "train", desc="")
    root.mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(store.images[i].permute(1, 2, 0).numpy()).save(root / f"{i:03d}.png")
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": store.captions[i][0]}))
    if captions:
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_evaluate_cli_on_a_folder_and_compare(ldm_run, tmp_path, capsys):
    from ldm.evaluate import main

    folder = _folder(tmp_path / "images", 12, captions=True)
    args = [str(ldm_run), "--data", str(folder), "--n", "4", "--steps", "2", "--bootstrap", "10", "--device", "cpu"]
    main([*args, "--out", str(tmp_path / "a")])
    first = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert first["n"] == 4 and first["features"].startswith("clip:")  # the CLIP the pipeline was trained with
    assert first["split"]["eval_size"] == 4 and first["split"]["count"] == 4  # held out by key hash
    assert {"fid", "fid_floor", "kid", "top1", "top1_ceiling", "mean_rank_chance"} <= set(first["quality"])
    assert len(first["items"]) == 4 and sum(i["rank"] == 1 for i in first["items"]) / 4 == first["quality"]["top1"]
    assert sum(i["real_rank"] == 1 for i in first["items"]) / 4 == first["quality"]["top1_ceiling"]
    assert "top-1 misses:" in capsys.readouterr().out
    with Image.open(tmp_path / "a" / "heldout-vs-generated.png") as grid:  # 4 held-out above their 4 generated
        assert grid.size == (8 * 18 + 2, 2 * 18 + 2)
    main([*args, "--out", str(tmp_path / "b"), "--compare", str(tmp_path / "a" / "eval.json")])
    second = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert second["quality"]["fid"] == pytest.approx(first["quality"]["fid"])  # fixed seeds: the same images
    assert second["compared_with"]["quality"] == first["quality"]
    with pytest.raises(SystemExit, match="cannot be compared.*n 3 vs 4"):
        main([*args[:4], "3", *args[5:], "--out", str(tmp_path / "c"), "--compare", str(tmp_path / "a" / "eval.json")])
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit, match="offset 4 vs 0"):  # other held-out images: refused before sampling
        main([*args, "--offset", "4", "--out", str(tmp_path / "e"), "--compare", str(tmp_path / "a" / "eval.json")])
    assert first["offset"] == 0
    # without captions: FID/KID still run, retrieval is skipped with a note
    bare = _folder(tmp_path / "bare", 12, captions=False)
    main([str(ldm_run), "--data", str(bare), "--n", "4", "--steps", "2", "--bootstrap", "0", "--out", str(tmp_path / "d")])
    record = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert "fid" in record["quality"] and "top1" not in record["quality"] and record["items"] == []
    assert "have no caption" in record["quality"]["retrieval_skipped"]
    assert "caption retrieval skipped" in capsys.readouterr().out


def test_stage3_quality_config_is_checked_and_off_without_a_clip(latents, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ConfigError, match="validation.features: .*not clip:<dir> or inception:<file>"):
        ldm_cfg(tmp_path, latents, "validation.features=vgg")
    with pytest.raises(ConfigError, match="validation.quality_n must be >= 0"):
        ldm_cfg(tmp_path, latents, "validation.quality_n=-1")
    assert data_config_of_cache(json.loads((latents["cache"] / "manifest.json").read_text())).eval_size == 4


def test_stage1_rfid_and_rkid_with_the_run_clip_named(clip_dir, tmp_path):
    from ldm.train.vae import VAETrainConfig, train_vae

    args = ["data.source.kind=shapes", "data.source.size=16", "data.source.resolution=16", "data.transform.resolution=16",
            "data.eval_size=6", "model.preset=tiny-f4", "train.batch_size=4", "train.steps=2", "train.eval_every=1",
            "train.log_every=1", "scale_images=8", f"features=clip:{clip_dir}", f"out_dir={tmp_path / 'vae'}"]
    train_vae(load_config(VAETrainConfig, None, args))
    results = json.loads((tmp_path / "vae" / "eval.json").read_text())
    assert results["features"].startswith(f"clip:{clip_dir}@") and results["n"] == 6
    assert results["rfid"] > 0 and isinstance(results["rkid"], float) and results["psnr"] > 0
    records = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("eval/features") == results["features"] and "eval/rfid" in r for r in records)
    with pytest.raises(IncomparableMetricsError, match="n 5 vs 6"):  # resumed with another held-out N
        train_vae(load_config(VAETrainConfig, None, [*args, "data.eval_size=5", "train.steps=3"]))
    with pytest.raises(ConfigError, match="features: .*no CLIP trained by train_clip.py"):
        load_config(VAETrainConfig, None, [*args, f"features=clip:{tmp_path}"])


def test_real_images_take_held_out_by_hash_not_the_first_of_a_sorted_folder(tmp_path):
    """A folder sorted by category: the n held-out images measured are the n with the smallest key
    hashes (a mix of categories), not the first n of the held-out split (one category)."""
    from ldm.data.split import heldout_by_count

    root = tmp_path / "sorted"
    rows = []
    for category, colour in (("a-red", (255, 0, 0)), ("b-blue", (0, 0, 255))):
        (root / category).mkdir(parents=True)
        for i in range(40):
            Image.new("RGB", (8, 8), colour).save(root / category / f"{i:02d}.png")
            rows.append(json.dumps({"file_name": f"{category}/{i:02d}.png", "text": f"{category} {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    data = DataConfig(source=SourceConfig(kind="imagefolder", path=str(root)), eval_size=30)
    data.transform.resolution = 8
    held_out, captions, _ = real_images(data, 10)
    keys = [f"{c.split()[0]}/{int(c.split()[1]):02d}.png" for c in captions]
    assert set(keys) == heldout_by_count(heldout_by_count([json.loads(r)["file_name"] for r in rows], 30), 10)
    assert {k.split("/")[0] for k in keys} == {"a-red", "b-blue"}
    assert len(held_out) == 10
    # --offset 10: the next 10 by hash, none of the report's 10 (a set to choose settings on)
    _, second, _ = real_images(data, 10, offset=10)
    second_keys = {f"{c.split()[0]}/{int(c.split()[1]):02d}.png" for c in second}
    assert second_keys == heldout_by_count(heldout_by_count([json.loads(r)["file_name"] for r in rows], 30), 20) - set(keys)
    with pytest.raises(ValueError, match="offset 29: the data holds 30 held-out images"):
        real_images(data, 10, offset=29)


def test_evaluate_takes_a_prepared_folders_own_split(tmp_path):
    """`python -m ldm.evaluate --data` on a folder with heldout.txt holds out exactly those files, so
    its floor compares with the figures of a run trained on that folder."""
    from ldm.evaluate import folder_data

    root = _folder(tmp_path / "prepared", 12, captions=True)
    (root / "heldout.txt").write_text("003.png\n007.png\n011.png\n")
    data = folder_data(root, 16, n=2)
    assert data.heldout == str(root / "heldout.txt") and data.eval_size is None
    assert sorted(load_images(data, "eval", desc="").ids) == ["003.png", "007.png", "011.png"]
    assert folder_data(_folder(tmp_path / "plain", 12, captions=True), 16, n=2).eval_size == 2
