"""Images for training: a source plus a transform, decoded once into a compact in-memory store.

Stage 1 and the encoder read images through `ImageStore`: every usable record of the source is
decoded, converted and resized/cropped once (bad files skipped and counted in the report), and
kept as uint8 CHW tensors with their captions. Random access by index makes the data order a
pure function of (seed, step), which is what exact resume needs.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.config import require
from ldm.data.captions import CaptionConfig
from ldm.data.sources import DataReport, SourceConfig, check_compatible, open_source
from ldm.data.transforms import TransformConfig, prepare_image


@dataclasses.dataclass
class DataConfig:
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    transform: TransformConfig = dataclasses.field(default_factory=TransformConfig)
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)
    eval_size: int = 64      # held-out images (the last ones of the source; for shapes, another seed)
    max_images: int = 0      # use at most this many training images (0: all)

    def validate(self) -> None:
        require(self.eval_size >= 0, "data.eval_size must be >= 0")
        check_compatible(self.source, self.transform)
        require(self.max_images >= 0, "data.max_images must be >= 0")


class ImageStore(torch.utils.data.Dataset):
    """uint8 CHW images (one size, or per-bucket sizes) with their captions and metadata."""

    def __init__(self, images: list[torch.Tensor], captions: list[list[str]], ids: list[str], meta: list[dict], report: DataReport):
        self.images, self.captions, self.ids, self.meta, self.report = images, captions, ids, meta, report

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].float().div(127.5).sub(1.0)

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self[i] for i in indices])


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def iter_prepared(cfg: DataConfig, split: str, report: DataReport, keep=lambda index: True, desc: str | None = None):
    """Yield (index, image tensor in [-1, 1], captions, id, meta) for the split's usable records.

    Splits: for the synthetic `shapes` source the eval split is a fresh draw with another seed;
    for files it is the last `eval_size` records, so both splits are fixed by the source.
    `keep(index)` selects records by their index in the split (for shards and processes);
    records it rejects are still read, but not transformed.
    """
    source_cfg = _split_source(cfg, split)
    source = open_source(source_cfg, report, cfg.transform)
    n_total = len(source) if hasattr(source, "__len__") else None
    lo, hi = 0, n_total
    if source_cfg.kind != "shapes" and n_total is not None:
        cut = max(0, n_total - cfg.eval_size)
        lo, hi = (0, cut) if split == "train" else (cut, n_total)
    if split == "train" and cfg.max_images:
        hi = min(hi, lo + cfg.max_images) if hi is not None else lo + cfg.max_images
    seed = getattr(source_cfg, "seed", 0)
    for position, record in enumerate(tqdm(source, desc=desc or f"read {split}", total=hi, disable=desc == "")):
        if hi is not None and position >= hi:
            break
        index = position - lo
        if index < 0 or not keep(index):
            continue
        # important: a random crop drawn from the record's own index, not one shared stream, so a
        # record gets the same crop whichever others are kept (resumed encode, several processes)
        tensor, meta = prepare_image(record.image, cfg.transform, random.Random(f"{seed}/{index}"))
        yield index, tensor, list(record.captions), record.id, meta


def load_images(cfg: DataConfig, split: str = "train", rank: int = 0, world: int = 1, desc: str | None = None) -> ImageStore:
    """Decode the train or eval split into an ImageStore (this process's part: index % world == rank)."""
    report = DataReport()
    images, captions, ids, meta = [], [], [], []
    for _, tensor, caps, rid, info in iter_prepared(cfg, split, report, lambda i: i % world == rank, desc):
        images.append(_to_uint8(tensor))
        captions.append(caps)
        ids.append(rid)
        meta.append(info)
    return ImageStore(images, captions, ids, meta, report)


def _split_source(cfg: DataConfig, split: str) -> SourceConfig:
    if split == "train" or cfg.source.kind != "shapes":
        return cfg.source
    # Held-out shapes: another seed, so no training image is evaluated on.
    return dataclasses.replace(cfg.source, seed=cfg.source.seed + 1_000_003, size=cfg.eval_size)


def image_grid(images: torch.Tensor | list, nrow: int | None = None, pad: int = 2):
    """A PIL grid of images given as a (B,3,H,W) tensor in [-1, 1] or a list of PIL images."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        arr = _to_uint8(images.detach().cpu().float()).permute(0, 2, 3, 1).numpy()
        pil = [Image.fromarray(a) for a in arr]
    else:
        pil = list(images)
    nrow = nrow or int(np.ceil(np.sqrt(len(pil))))
    w, h = pil[0].size
    rows = int(np.ceil(len(pil) / nrow))
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(pil):
        grid.paste(im, (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    return grid
