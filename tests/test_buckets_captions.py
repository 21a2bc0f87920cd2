"""Aspect-ratio buckets, resize/crop, the bucket batch sampler, captions, and the shapes source."""

from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image

from ldm.config import ConfigError, validate
from ldm.data.captions import CaptionConfig, process_caption
from ldm.data.sources import DataReport, SourceConfig, check_compatible, open_source
from ldm.data.transforms import (BucketBatchSampler, TransformConfig, assign_bucket, make_buckets, overshoot,
                                 prepare_image)

BUCKET_SETTINGS = [  # (pixels, step, min_side, max_side)
    (512 * 512, 64, 256, 1024),
    (1024 * 1024, 64, 512, 2048),
    (512 * 768, 64, 256, 1024),
    (256 * 256, 32, 128, 512),
    (96 * 96, 16, 48, 192),
]


@pytest.mark.parametrize("pixels,step,lo,hi", BUCKET_SETTINGS)
def test_buckets_are_on_the_grid_within_budget_and_symmetric(pixels, step, lo, hi):
    buckets = make_buckets(pixels, step, lo, hi)
    assert buckets and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= pixels and lo <= min(w, h) and max(w, h) <= hi
        assert (h, w) in buckets


@pytest.mark.parametrize("pixels,step,lo,hi", BUCKET_SETTINGS)
def test_every_image_keeps_its_aspect_ratio_within_one_step(pixels, step, lo, hi):
    buckets = make_buckets(pixels, step, lo, hi)
    ratios = [w / h for w, h in buckets]
    rng = random.Random(pixels + step)
    for _ in range(2000):
        aspect = math.exp(rng.uniform(math.log(min(ratios)), math.log(max(ratios))))
        h = rng.randint(64, 4000)
        w = max(1, round(h * aspect))
        bucket = assign_bucket(w, h, buckets)
        assert overshoot((w, h), bucket) <= step + 1e-6, (w, h, bucket)


def test_prepare_image_crops_at_most_one_step_and_keeps_meta():
    cfg = TransformConfig(resolution=64, buckets=True, bucket_step=16, crop="random")
    rng = random.Random(0)
    for w, h in [(300, 200), (200, 300), (640, 480), (100, 100), (1000, 260), (90, 70)]:
        img = Image.new("RGB", (w, h), (255, 0, 0))
        x, meta = prepare_image(img, cfg, rng)
        th, tw = meta["target_size"]
        assert x.shape == (3, th, tw) and th * tw <= 64 * 64 and th % 16 == 0 and tw % 16 == 0
        assert meta["original_size"] == (h, w)
        top, left = meta["crop_top_left"]
        assert 0 <= top <= 16 and 0 <= left <= 16
        assert torch.allclose(x[0], torch.ones(th, tw), atol=0.02) and x[1:].abs().max() > 0.98  # red, in [-1, 1]


def test_prepare_image_square_center_crop_and_small_policy():
    img = Image.new("RGB", (40, 20))
    img.paste((255, 255, 255), (10, 0, 30, 20))  # the middle 20x20 is white
    x, meta = prepare_image(img, TransformConfig(resolution=10), random.Random(0))
    assert x.shape == (3, 10, 10) and meta["crop_top_left"] == (0, 5)
    assert x.mean() > 0.95  # the center crop is the white middle (black sides cut off)
    with pytest.raises(ValueError, match="smaller than its target 32x32"):
        prepare_image(img, TransformConfig(resolution=32, small_policy="skip"), random.Random(0))
    assert prepare_image(img, TransformConfig(resolution=32), random.Random(0))[0].shape == (3, 32, 32)


def test_transform_config_validation():
    with pytest.raises(ConfigError, match="no bucket fits"):
        validate(TransformConfig(resolution=64, buckets=True, bucket_step=64, bucket_min_side=128))
    validate(TransformConfig(resolution=512, buckets=True))


@pytest.mark.parametrize("drop_last", [False, True])
def test_bucket_batch_sampler(drop_last):
    gen = torch.Generator().manual_seed(0)
    bucket_ids = torch.randint(0, 4, (103,), generator=gen).tolist()
    sampler = BucketBatchSampler(bucket_ids, batch_size=8, seed=1, drop_last=drop_last)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len({bucket_ids[i] for i in b}) == 1 for b in batches)
        seen = sorted(i for b in batches for i in b)
        if drop_last:
            assert all(len(b) == 8 for b in batches) and len(set(seen)) == len(seen)
        else:
            assert seen == list(range(len(bucket_ids)))
        assert list(sampler) == batches  # same (seed, epoch), same order
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    ordered = list(BucketBatchSampler(bucket_ids, batch_size=8, shuffle=False))
    assert ordered[0] == [i for i, b in enumerate(bucket_ids) if b == 0][:8]


def test_process_caption_tags_prefix_suffix():
    cfg = CaptionConfig(shuffle_tags=True, keep_tokens=2, prefix="sks", suffix="best quality")
    caption = "a dog, photo, grass, sky, running, blue collar"
    outputs = {process_caption([caption], cfg, random.Random(seed)) for seed in range(20)}
    assert len(outputs) > 1
    for out in outputs:
        tags = out.split(", ")
        assert tags[:3] == ["sks", "a dog", "photo"] and tags[-1] == "best quality"
        assert sorted(tags[3:-1]) == sorted(["grass", "sky", "running", "blue collar"])
    assert process_caption([""], CaptionConfig(prefix="sks"), random.Random(0)) == "sks"
    assert process_caption(["a, b"], CaptionConfig(), random.Random(0)) == "a, b"


def test_two_captions_per_image_are_both_used_over_an_epoch():
    source = open_source(SourceConfig(kind="shapes", size=16, resolution=16, captions_per_image=2))
    rng = random.Random(0)
    picked_positions = set()
    for record in source:
        assert len(record.captions) == 2 and record.captions[0] != record.captions[1]
        picked = process_caption(record.captions, CaptionConfig(), rng)
        picked_positions.add(record.captions.index(picked))
        assert record.image.size == (16, 16) and record.image.mode == "RGB"
    assert picked_positions == {0, 1}
    assert source.report.counts == {"ok": 16}


def test_flip_is_refused_for_shapes():
    with pytest.raises(ConfigError, match="flip=true with source.kind=shapes"):
        check_compatible(SourceConfig(kind="shapes"), TransformConfig(flip=True))
    with pytest.raises(ConfigError, match="flip"):
        open_source(SourceConfig(kind="shapes", size=2), DataReport(), TransformConfig(flip=True))
    check_compatible(SourceConfig(kind="imagefolder", path="x"), TransformConfig(flip=True))
