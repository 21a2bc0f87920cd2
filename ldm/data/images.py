"""Images for training: a source plus a transform, decoded once into a compact in-memory store.

Stage 1 and the encoder read images through `ImageStore`: every usable record of the source is
decoded, converted and resized/cropped once (bad files skipped and counted in the report), and
kept as uint8 CHW tensors with their captions. Random access by index makes the data order a
pure function of (seed, step), which is what exact resume needs.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.config import ConfigError, require
from ldm.data.captions import CaptionConfig
from ldm.data.sources import DataReport, Source, SourceConfig, check_compatible, open_source
from ldm.data.split import (LIST_RULE, SHAPES_RULE, SPLIT_RULE, HeldOut, check_listed, heldout_by_count, is_heldout,
                            read_key_list)
from ldm.data.transforms import TransformConfig, prepare_image


DEFAULT_EVAL_SIZE = 64  # held-out records when the config chooses none
SHAPES_EVAL_SEED = 1_000_003  # added to the shapes seed for the held-out draw


@dataclasses.dataclass
class DataConfig:
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    transform: TransformConfig = dataclasses.field(default_factory=TransformConfig)
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)
    # The held-out records, by a hash of each record's key (ldm.data.split), set in one of three ways:
    eval_size: int | None = None  # the N records with the smallest key hash (null: 64 unless one of the next two is
                                  # set); shapes: N images drawn with another seed
    eval_fraction: float = 0.0    # or: each record whose key hash is below this fraction (works on streams)
    heldout: str = ""             # or: a file of keys, one a line (like a prepared folder's heldout.txt), or a
                                  # subfolder of the source, or a folder apart from it (read for evaluation only)
    max_images: int = 0      # use at most this many training images (0: all)

    @property
    def eval_count(self) -> int | None:
        """The number of held-out records when chosen by count (eval_size or its default), else None."""
        if self.eval_size is not None:
            return self.eval_size
        return None if self.eval_fraction or self.heldout else DEFAULT_EVAL_SIZE

    def validate(self) -> None:
        require(self.eval_size is None or self.eval_size >= 0, "data.eval_size must be >= 0")
        require(0 <= self.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        chosen = [name for name, on in (("data.eval_size", self.eval_size is not None),
                                        ("data.eval_fraction", self.eval_fraction > 0),
                                        ("data.heldout", bool(self.heldout))) if on]
        require(len(chosen) <= 1, f"{' and '.join(chosen)} are both set: each chooses the held-out records on its "
                                  "own; keep one (data.eval_size=null clears a count set by default or elsewhere)")
        require(not (self.heldout and self.source.kind == "shapes"),
                "data.heldout: the shapes source draws its held-out images with another seed; use data.eval_size")
        check_compatible(self.source, self.transform)
        require(self.max_images >= 0, "data.max_images must be >= 0")


class ImageStore(torch.utils.data.Dataset):
    """uint8 CHW images (one size, or per-bucket sizes) with their captions and metadata."""

    def __init__(self, images: list[torch.Tensor], captions: list[list[str]], ids: list[str], meta: list[dict], report: DataReport,
                 split: dict | None = None):
        self.images, self.captions, self.ids, self.meta, self.report = images, captions, ids, meta, report
        self.split = split  # the held-out set's record (ldm.data.split.HeldOut.record), written beside eval figures

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].float().div(127.5).sub(1.0)

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self[i] for i in indices])


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def iter_prepared(cfg: DataConfig, split: str, report: DataReport, keep=lambda index: True, desc: str | None = None,
                  heldout: HeldOut | None = None):
    """Yield (index, image tensor in [-1, 1], captions, id, meta) for the split's usable records.

    Splits: a record is held out by its key alone (`plan_split`, ldm.data.split), so both splits
    are fixed by the source's keys, not their order; for the synthetic `shapes` source the eval
    split is a fresh draw with another seed. `heldout`: a plan made once for several passes (it
    collects a stream's held-out keys). `keep(index)` selects records by their index in the split
    (for shards and processes); records it rejects are still read, but not transformed.
    """
    heldout = heldout if heldout is not None else plan_split(cfg)
    source = split_source(cfg, split, heldout, report)
    hi = len(source) if hasattr(source, "__len__") else None
    if split == "train" and cfg.max_images:
        hi = min(hi, cfg.max_images) if hi is not None else cfg.max_images
    seed = cfg.source.seed + (SHAPES_EVAL_SEED if cfg.source.kind == "shapes" and split == "eval" else 0)
    for index, record in enumerate(tqdm(source, desc=desc or f"read {split}", total=hi, disable=desc == "")):
        if hi is not None and index >= hi:
            break
        if not keep(index):
            continue
        # important: a random crop drawn from the record's own index, not one shared stream, so a
        # record gets the same crop whichever others are kept (resumed encode, several processes)
        tensor, meta = prepare_image(record.image, cfg.transform, random.Random(f"{seed}/{index}"))
        yield index, tensor, list(record.captions), record.id, meta


def load_images(cfg: DataConfig, split: str = "train", rank: int = 0, world: int = 1, desc: str | None = None) -> ImageStore:
    """Decode the train or eval split into an ImageStore (this process's part: index % world == rank).

    The store's `split` is the record of the held-out set (`HeldOut.record`) to write beside
    its figures; for a stream its count and hash are known once the eval split has been read.
    """
    report = DataReport()
    heldout = plan_split(cfg)
    images, captions, ids, meta = [], [], [], []
    for _, tensor, caps, rid, info in iter_prepared(cfg, split, report, lambda i: i % world == rank, desc, heldout):
        images.append(_to_uint8(tensor))
        captions.append(caps)
        ids.append(rid)
        meta.append(info)
    return ImageStore(images, captions, ids, meta, report, heldout.record())


# ----------------------------------------------------------------------------- the held-out split


def plan_split(cfg: DataConfig) -> HeldOut:
    """Which records of `cfg.source` are held out, by the rule its settings choose (see
    ldm.data.split). A sized source lists its keys first, without reading an image; a stream
    decides each key as it passes, so it needs eval_fraction or a list, not a count."""
    if cfg.source.kind == "shapes":
        n = cfg.eval_count if cfg.eval_count is not None else round(cfg.eval_fraction * cfg.source.size)
        seed = cfg.source.seed + SHAPES_EVAL_SEED
        return HeldOut(SHAPES_RULE, {"eval_size": n, "seed": seed}, frozenset(f"shapes-{seed}/{i}" for i in range(n)))
    if cfg.heldout:
        return _listed_split(cfg)
    source = open_source(cfg.source)
    if cfg.eval_fraction:
        settings = {"eval_fraction": cfg.eval_fraction}
        if not hasattr(source, "__len__"):
            return HeldOut(SPLIT_RULE, settings, None, fraction=cfg.eval_fraction)
        return HeldOut(SPLIT_RULE, settings, frozenset(k for k in source.keys() if is_heldout(k, cfg.eval_fraction)))
    if not hasattr(source, "__len__"):
        default = " (the default)" if cfg.eval_size is None else ""
        raise ConfigError(f"data.eval_size={cfg.eval_count}{default}: the source {cfg.source.path!r} is a stream of "
                          "unknown length, so the records with the smallest key hashes are not known before all "
                          "of it is read; set data.eval_size=null and data.eval_fraction=F (held out by key hash "
                          "as records pass), or data.heldout=FILE")
    return HeldOut(SPLIT_RULE, {"eval_size": cfg.eval_count}, frozenset(heldout_by_count(source.keys(), cfg.eval_count)))


def _listed_split(cfg: DataConfig) -> HeldOut:
    """data.heldout: a key list, a folder inside an imagefolder source (its records), or another folder
    (read as an imagefolder: the held-out records, beside all of the source for training)."""
    path, settings = Path(cfg.heldout), {"heldout": cfg.heldout}
    if path.is_file():
        listed = frozenset(read_key_list(path))
        source = open_source(cfg.source)
        if hasattr(source, "__len__"):
            check_listed(listed, set(source.keys()), str(path))
        return HeldOut(LIST_RULE, settings, listed, list_file=str(path))  # a stream: checked at the end of a pass
    if not path.is_dir():
        raise ConfigError(f"data.heldout: {cfg.heldout} is neither a key list file nor a folder")
    root = Path(cfg.source.path).resolve() if cfg.source.kind == "imagefolder" else None
    folder = path.resolve()
    if root is not None and (folder == root or root.is_relative_to(folder)):
        raise ConfigError(f"data.heldout: {cfg.heldout} holds the whole source {cfg.source.path}; "
                          "name a subfolder or another folder")
    if root is not None and folder.is_relative_to(root):
        prefix = folder.relative_to(root).as_posix() + "/"
        keys = frozenset(k for k in open_source(cfg.source).keys() if k.startswith(prefix))
        return HeldOut(LIST_RULE, settings, keys)
    return HeldOut(LIST_RULE, settings, frozenset(open_source(_folder_source(cfg.source, cfg.heldout)).keys()),
                   folder=cfg.heldout)


def _folder_source(source: SourceConfig, folder: str) -> SourceConfig:
    """A held-out folder apart from the source, read as an imagefolder with the source's caption settings."""
    return dataclasses.replace(source, kind="imagefolder", path=folder, streaming=False)


def split_source(cfg: DataConfig, split: str, heldout: HeldOut, report: DataReport) -> Source:
    """The source of `split`'s records, bad ones counted in `report`."""
    require(split in ("train", "eval"), f"split must be 'train' or 'eval', got {split!r}")
    if cfg.source.kind == "shapes" and split == "eval":
        # Held-out shapes: another seed, so no training image is evaluated on.
        eval_cfg = dataclasses.replace(cfg.source, seed=cfg.source.seed + SHAPES_EVAL_SEED, size=len(heldout.keys))
        return open_source(eval_cfg, report, cfg.transform)
    if heldout.folder and split == "eval":
        return open_source(_folder_source(cfg.source, heldout.folder), report, cfg.transform)
    source = open_source(cfg.source, report, cfg.transform)
    if cfg.source.kind == "shapes" or heldout.folder:
        return source  # training: every record (the held-out ones are drawn or read elsewhere)
    return source.where(functools.partial(_in_split, heldout, split == "eval"), heldout.finish_pass)


def _in_split(heldout: HeldOut, held: bool, key: str | None) -> bool:
    return (key is not None and key in heldout) == held  # an item that is no image: read with training


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
