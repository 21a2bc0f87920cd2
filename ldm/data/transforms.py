"""From a decoded RGB image to a training tensor: resize to cover, crop, aspect-ratio buckets.

Square mode scales the image so it covers `resolution` x `resolution` and crops the excess.
Bucket mode (NovelAI's aspect-ratio bucketing, as in kohya-ss sd-scripts) gives every image
the bucket shape it covers with the least crop, so a 3:2 photo trains as a 3:2 tensor instead
of losing its sides to a square crop; within the buckets' range of aspect ratios at most one
`bucket_step` of the image is cut away.

No flip happens here. A flip drawn once at preprocessing time would freeze one mirror image
into every stored copy (a known flaw of DiT's feature cache); consumers mirror per epoch
instead (the latent cache stores both mirror images). `flip` only records that they may.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ldm.config import require

Size = tuple[int, int]  # (width, height) in px, PIL's order


@dataclasses.dataclass
class TransformConfig:
    resolution: int = 64                 # px: side of the square target; its square is the default bucket budget
    crop: Literal["center", "random"] = "center"  # where the crop window sits on the resized image
    flip: bool = False                   # consumers may mirror images each epoch (never for captions naming sides)
    buckets: bool = False                # aspect-ratio buckets instead of one square size
    bucket_pixels: int | None = None     # px (w*h) budget per bucket; None: resolution**2
    bucket_step: int = 64                # px: bucket sides are multiples of it (VAE x U-Net downsampling)
    bucket_min_side: int | None = None   # px: shortest bucket side; None: resolution / 2, rounded up to a step
    bucket_max_side: int | None = None   # px: longest bucket side; None: 2 x resolution
    small_policy: Literal["skip", "upscale"] = "upscale"  # image smaller than its target: skip or upscale (counted)

    def validate(self) -> None:
        require(self.resolution > 0, f"resolution must be > 0 px, got {self.resolution}")
        if not self.buckets:
            return
        require(self.bucket_step > 0, f"bucket_step must be > 0 px, got {self.bucket_step}")
        pixels, step, lo, hi = bucket_params(self)
        require(pixels > 0, f"bucket_pixels must be > 0, got {pixels}")
        require(0 < lo <= hi, f"bucket_min_side ({lo}) must be > 0 and <= bucket_max_side ({hi})")
        require(bool(bucket_list(self)), f"no bucket fits: sides multiples of {step} in [{lo}, {hi}] px "
                f"with width*height <= {pixels} px; raise bucket_pixels or lower bucket_min_side")


def bucket_params(cfg: TransformConfig) -> tuple[int, int, int, int]:
    """(pixels, step, min_side, max_side) with the config's defaults filled in."""
    step = cfg.bucket_step
    pixels = cfg.bucket_pixels if cfg.bucket_pixels is not None else cfg.resolution**2
    lo = cfg.bucket_min_side if cfg.bucket_min_side is not None else step * math.ceil(cfg.resolution / 2 / step)
    hi = cfg.bucket_max_side if cfg.bucket_max_side is not None else 2 * cfg.resolution
    return pixels, step, lo, hi


def bucket_list(cfg: TransformConfig) -> list[Size]:
    """The config's buckets (empty when bucketing is off)."""
    return list(_buckets(*bucket_params(cfg))) if cfg.buckets else []


def make_buckets(pixels: int, step: int = 64, min_side: int = 256, max_side: int = 1024) -> list[Size]:
    """Bucket shapes (w, h): sides multiples of `step` in [min_side, max_side], w * h <= pixels.

    NovelAI's recipe: for every width the tallest height within the budget, and the transposes
    so portrait and landscape get the same shapes. Sorted by aspect ratio w / h.
    """
    return list(_buckets(pixels, step, min_side, max_side))


@functools.lru_cache(maxsize=64)
def _buckets(pixels: int, step: int, min_side: int, max_side: int) -> tuple[Size, ...]:
    if step <= 0 or pixels <= 0:
        raise ValueError(f"step ({step}) and pixels ({pixels}) must be > 0")
    shapes = set()
    for w in range(step * math.ceil(min_side / step), max_side + 1, step):
        h = min(max_side, pixels // w // step * step)
        if h >= min_side:
            shapes |= {(w, h), (h, w)}
    return tuple(sorted(shapes, key=lambda s: (s[0] / s[1], s[0])))


def overshoot(size: Size, target: Size) -> float:
    """px the image overshoots `target` on its cropped side once resized to just cover it."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    return max(w * scale - tw, h * scale - th)


def assign_bucket(w: int, h: int, buckets: Sequence[Size]) -> Size:
    """The bucket a w x h image covers with the least crop (ties: the larger bucket).

    Least crop rather than nearest log aspect ratio: on NovelAI's bucket list the nearest
    ratio crops up to about two steps (125 px at 512² with step 64), the least crop at most
    one step for any aspect ratio inside the list's range.
    """
    if not buckets:
        raise ValueError("assign_bucket needs at least one bucket")
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    return min(buckets, key=lambda b: (overshoot((w, h), b), -b[0] * b[1]))


def target_size(size: Size, cfg: TransformConfig) -> Size:
    """(w, h) the image becomes: its bucket, or the square."""
    if cfg.buckets:
        return assign_bucket(*size, bucket_list(cfg))
    return cfg.resolution, cfg.resolution


def is_too_small(size: Size, target: Size) -> bool:
    """True when covering `target` needs upscaling (either side shorter than the target's)."""
    return size[0] < target[0] or size[1] < target[1]


def prepare_image(img: Image.Image, cfg: TransformConfig, rng: random.Random,
                  bucket: Size | None = None) -> tuple[torch.Tensor, dict]:
    """Resize an RGB image to cover its target, crop, and scale to a CHW float tensor in [-1, 1].

    `bucket` (w, h) overrides the target (default: `target_size`). The meta dict uses SDXL's
    micro-conditioning names and order (height, width) / (top, left): `original_size`,
    `crop_top_left`, `target_size`. An image too small for its target with small_policy
    "skip" is an error here: `open_source(..., transform=cfg)` skips and counts those first.
    """
    if img.mode != "RGB":
        raise ValueError(f"prepare_image needs an RGB image, got mode {img.mode!r} (load it through open_source)")
    tw, th = bucket or target_size(img.size, cfg)
    if cfg.small_policy == "skip" and is_too_small(img.size, (tw, th)):
        raise ValueError(f"image {img.width}x{img.height} is smaller than its target {tw}x{th} and "
                         "small_policy is 'skip': pass transform= to open_source, which skips and counts it")
    scale = max(tw / img.width, th / img.height)
    rw, rh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    left, top = _crop_origin(rw - tw, rh - th, cfg.crop, rng)
    resized = img.resize((rw, rh), Image.Resampling.BICUBIC)
    out = pil_to_tensor(resized.crop((left, top, left + tw, top + th))).float().div(127.5).sub(1.0)
    meta = {"original_size": (img.height, img.width), "crop_top_left": (top, left), "target_size": (th, tw)}
    return out, meta


def _crop_origin(spare_w: int, spare_h: int, crop: str, rng: random.Random) -> tuple[int, int]:
    if crop == "center":
        return spare_w // 2, spare_h // 2
    return rng.randint(0, spare_w), rng.randint(0, spare_h)


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket; every index once per epoch.

    Order is a pure function of (seed, epoch): call `set_epoch` before each epoch (as with
    DistributedSampler). With shuffle, indices are shuffled within their bucket and the
    batches of all buckets are interleaved at random; drop_last drops each bucket's
    incomplete last batch, so every batch has exactly `batch_size` items.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, seed: int = 0,
                 drop_last: bool = False, shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.groups: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_ids):
            self.groups.setdefault(int(bucket), []).append(index)
        self.batch_size, self.seed, self.drop_last, self.shuffle = batch_size, seed, drop_last, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for bucket in sorted(self.groups):
            indices = self.groups[bucket]
            if self.shuffle:
                indices = [indices[i] for i in rng.permutation(len(indices))]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        whole = math.floor if self.drop_last else math.ceil
        return sum(whole(len(g) / self.batch_size) for g in self.groups.values())
