"""`python demo.py --preset emoji_cpu` chains on the prepared emoji at a tiny size: the data is
prepared on first use, every stage reads it with the same hash split, and the run ends with
FID/KID/retrieval figures against held-out images and the held-out-vs-generated grid.

Needs Debian's emoji font and Unicode/CLDR data, which `.ci/run` installs.
"""

from __future__ import annotations

import json

import pytest

from ldm.data import prepare
from ldm.demo import run_demo

NEEDED = [prepare.EMOJI_FONT, prepare.EMOJI_TEST, *prepare.CLDR_ANNOTATIONS]
pytestmark = pytest.mark.skipif(not all(p.is_file() for p in NEEDED),
                                reason="needs fonts-noto-color-emoji, unicode-data, unicode-cldr-core (.ci/run installs them)")


def overrides(data: str) -> dict[str, list[str]]:
    source = [f"data.source.path={data}", "data.transform.resolution=32", "data.max_images=48"]
    loop = ["train.steps=2", "train.warmup_steps=0", "train.save_every=0"]
    return {
        "clip": [*source, *loop, "train.batch_size=16", "train.eval_every=0", "retrieval_candidates=8"],
        "vae": [*source, *loop, "train.batch_size=4", "train.eval_every=0", "crop_size=0", "scale_images=16"],
        "encode": [*source, "batch_size=64"],
        "ldm": [*loop, "train.batch_size=8", "train.eval_every=1", "model.block_out_channels=[16,32,32]",
                "validation.quality_n=8", "validation.quality_steps=1", "validation.steps=2", "validation.bootstrap=10",
                "validation.seeds=[0]", "validation.held_out_batches=1"],
    }


def test_emoji_preset_prepares_trains_and_measures(tmp_path):
    data = tmp_path / "data" / "emoji-32"  # <name>-<size>: demo.py prepares it when it is missing
    summary = run_demo(tmp_path / "run", preset="emoji_cpu", n_eval=8, overrides=overrides(str(data)))

    card = json.loads((data / "card.json").read_text())
    assert card["heldout"] == 400 and card["images"] > 3000 and summary["timings_s"]["data_s"] > 0
    quality = summary["quality"]
    assert quality["n"] == 8 and quality["features"].startswith(f"clip:{tmp_path / 'run' / 'clip'}@")
    for key in ("fid", "fid_floor", "kid", "top1", "top1_ceiling", "top1_chance", "fid_lo", "fid_hi"):
        assert isinstance(quality[key], float), key
    assert quality["fid_lo"] <= quality["fid"] <= quality["fid_hi"]
    assert (tmp_path / "run" / "heldout-vs-generated.png").exists()
    # the in-loop figures (step 1, then the end) and their cost, in the U-Net's metrics
    records = [json.loads(line) for line in (tmp_path / "run" / "ldm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "quality/fid" in r] == [1, 2]
    # every stage held out the same 400 files: the prepared heldout.txt
    manifest = json.loads((tmp_path / "run" / "latents" / "manifest.json").read_text())
    vae_split = summary["vae_eval"]["split"]
    assert manifest["split"]["keys_sha256"] == vae_split["keys_sha256"] and vae_split["count"] == 400
