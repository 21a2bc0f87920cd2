"""Image-caption sources: your own folder, a `datasets` dataset, webdataset tars, or the shapes.

`open_source(cfg)` gives `Record`s (an RGB PIL image, its captions, its size) in a fixed
order. Nothing bad reaches the caller and nothing is dropped silently: every file that cannot
be used is skipped, every odd one converted, and both are counted per reason, with example
names, in a `DataReport`.

Kinds (`SourceConfig.kind`):

- ``imagefolder``: every file under `path` (recursively, hidden ones aside). Captions come
  from a ``metadata.jsonl`` / ``metadata.csv`` (the `datasets` imagefolder convention: a
  ``file_name`` column relative to the metadata file, and a caption column), else from a
  sidecar ``<stem>.txt`` beside the image (the whole file is one caption). Files are opened
  by content, so a stray README is counted as ``not_an_image``.
- ``hf``: a `datasets` dataset: a `save_to_disk` directory, a local data directory, or a hub
  name (`datasets.load_dataset(name, split=..., streaming=...)`).
- ``webdataset``: ``.tar`` shards (a file, a folder of them, or a glob): members grouped by
  key (the path up to the first dot of the basename), read with our own `tarfile` reader so a
  corrupt member is counted, not fatal. Captions: the ``.txt`` member, else a ``.json``
  member's caption column.
- ``shapes``: the embedded synthetic dataset, `ldm.data.shapes.ShapesDataset`.

Each item has a split key, which alone decides whether it is held out (`ldm.data.split`): the
path relative to the folder root with forward slashes (imagefolder), the sample's ``__key__``
(webdataset, without the shard's name), the row index (hf, streaming or not). `Source.keys()`
lists them without reading an image; `Source.where(...)` keeps one split's items.

Image policy: EXIF orientation applied; RGBA / LA / palette-with-transparency composited on
white; CMYK, palette, grayscale -> RGB; 16-bit scaled to 8-bit (divided by 257, not clipped);
more than `max_pixels` pixels: a decompression bomb, skipped; truncated: skipped (we never set
PIL's global LOAD_TRUNCATED_IMAGES). Captions that are not UTF-8 are decoded with U+FFFD
replacement characters and kept (counted); a missing or empty caption is kept as "" or
skipped, by `no_caption`. With a `TransformConfig`, images smaller than their target are
skipped or kept for upscaling by its `small_policy`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import io
import itertools
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ldm.config import ConfigError, require
from ldm.data.transforms import TransformConfig, is_too_small, target_size

REASONS: dict[str, str] = {
    "ok": "usable records",
    "unreadable": "skipped: cannot be read or decoded (missing file, I/O error, decoder failure)",
    "truncated": "skipped: the image file ends early",
    "not_an_image": "skipped: no image format PIL recognises",
    "unsupported_mode": "skipped: pixel mode with no faithful RGB mapping (e.g. float 'F')",
    "decompression_bomb": "skipped: more pixels than source.max_pixels",
    "too_small_skipped": "skipped: smaller than its target size (transform.small_policy=skip)",
    "too_small_upscaled": "kept, upscaled: smaller than its target size (transform.small_policy=upscale)",
    "converted_rgba": "kept: RGBA composited on white",
    "converted_la": "kept: gray + alpha composited on white",
    "converted_palette": "kept: palette image to RGB (transparency composited on white)",
    "converted_cmyk": "kept: CMYK to RGB",
    "converted_16bit": "kept: 16-bit scaled to 8-bit",
    "converted_grayscale": "kept: grayscale to RGB",
    "converted_other": "kept: other colour space (YCbCr, LAB, HSV, ...) to RGB",
    "exif_rotated": "kept: EXIF orientation applied",
    "missing_caption": "no caption found: kept as \"\" or skipped (source.no_caption)",
    "empty_caption": "caption is blank: kept as \"\" or skipped (source.no_caption)",
    "non_utf8_caption": "kept: caption not UTF-8, decoded with U+FFFD replacements",
    "orphan_caption": "ignored: a caption file with no image beside it",
}
PIL_MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (~ 9459 x 9459)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # webdataset members
SHAPES_FIELDS = ("size", "resolution", "seed", "num_objects", "exclude", "captions_per_image", "two_object_fraction",
                 "attribute_dropout", "part_dropout")


@dataclasses.dataclass
class SourceConfig:
    kind: Literal["shapes", "imagefolder", "hf", "webdataset"] = "shapes"
    path: str = ""                 # folder; `datasets` dir or hub name; .tar file, folder of .tar or glob
    split: str = "train"           # hf: split to read (a saved single Dataset has none: ignored)
    streaming: bool = False        # hf: iterate without loading it all (length unknown)
    image_column: str = "image"    # hf: column holding the image
    caption_column: str = "text"   # metadata / hf / webdataset .json: caption column ("caption" tried if "text" is absent)
    caption_ext: str = ".txt"      # imagefolder sidecar and webdataset member holding a caption
    no_caption: Literal["keep", "skip"] = "keep"  # image with a missing or blank caption: keep with "" or skip (both counted)
    max_pixels: int = PIL_MAX_PIXELS  # px (w*h): larger images are decompression bombs, skipped
    # kind: shapes only (ldm.data.shapes.ShapesDataset)
    size: int = 2000               # number of images
    resolution: int = 64           # px, side of each image
    seed: int = 0                  # scene generator seed; image i is a function of (seed, i)
    num_objects: int = 1           # shapes per image (1 or 2)
    exclude: list[dict] = dataclasses.field(default_factory=list)  # attribute combinations held out of training
    captions_per_image: int = 1    # differently phrased captions per image
    two_object_fraction: float = 0.0  # with num_objects 1: this share of the scenes has two shapes, one caption naming both
    attribute_dropout: float = 0.0    # each caption leaves each attribute unsaid with this probability ("a red shape")
    part_dropout: float = 0.0         # each caption is cut to its objects or its background alone with this probability

    def validate(self) -> None:
        require(self.kind == "shapes" or bool(self.path), f"source.path is required for kind {self.kind!r}")
        require(self.max_pixels > 0, f"max_pixels must be > 0, got {self.max_pixels}")
        pil_limit = Image.MAX_IMAGE_PIXELS
        require(pil_limit is None or self.max_pixels <= 2 * pil_limit,
                f"max_pixels={self.max_pixels} is above PIL's hard limit 2 x PIL.Image.MAX_IMAGE_PIXELS "
                f"({2 * pil_limit}); raise PIL.Image.MAX_IMAGE_PIXELS in your script as well")
        require(self.caption_ext.startswith("."), f"caption_ext must start with '.', got {self.caption_ext!r}")
        if self.kind != "shapes":
            defaults = SourceConfig()
            changed = [f for f in SHAPES_FIELDS if getattr(self, f) != getattr(defaults, f)]
            require(not changed, f"{', '.join(changed)}: only for kind 'shapes', not {self.kind!r}")


def check_compatible(source: SourceConfig, transform: TransformConfig) -> None:
    """Refuse settings that contradict each other across the source and the transform.

    A mirrored shapes image would contradict its caption ("a red circle on the left"): we
    refuse flip for that source rather than rewrite captions, because no word list catches
    every way a caption can name a side.
    """
    require(not (transform.flip and source.kind == "shapes"),
            "transform.flip=true with source.kind=shapes: shapes captions name left and right, "
            "so a mirrored image would contradict its caption; set transform.flip=false")


@dataclasses.dataclass(frozen=True)
class Record:
    id: str                     # stable name: relative path, tar/key, row index
    image: Image.Image          # RGB, EXIF orientation applied
    captions: list[str]         # one or more alternatives ("" when kept without caption)
    size: tuple[int, int]       # (width, height) px of `image`


# ----------------------------------------------------------------------------- the report


@dataclasses.dataclass
class DataReport:
    """Counts per reason (see REASONS), the first few names per reason, and items skipped."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: int = 0              # items not yielded (each counted once, under its skip reason)
    max_examples: int = 5         # names kept per reason

    def note(self, reason: str, name: str) -> None:
        """Count `name` under `reason` (a kept item, or one of several notes on it)."""
        if reason not in REASONS:
            raise KeyError(f"unknown data report reason {reason!r}; known: {', '.join(REASONS)}")
        self.counts[reason] += 1
        names = self.examples.setdefault(reason, [])
        if reason != "ok" and len(names) < self.max_examples:
            names.append(name)

    def skip(self, reason: str, name: str) -> None:
        """Count `name` as not yielded, for `reason`."""
        self.note(reason, name)
        self.skipped += 1

    def merge(self, other: DataReport) -> DataReport:
        """Add another process's report into this one (returns self)."""
        self.counts.update(other.counts)
        self.skipped += other.skipped
        for reason, names in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(names[: self.max_examples - len(mine)])
        return self

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "skipped": self.skipped,
                "examples": {k: v for k, v in sorted(self.examples.items()) if v}}

    @classmethod
    def from_dict(cls, data: dict) -> DataReport:
        return cls(Counter(data["counts"]), {k: list(v) for k, v in data["examples"].items()}, data["skipped"])

    def summary(self) -> str:
        """A table: one row per reason seen, with its count, meaning and example names."""
        seen = [r for r in REASONS if self.counts[r]]
        width, meaning_width = (max((len(x) for x in column), default=0) for column in (seen, map(REASONS.get, seen)))
        lines = [f"data: {self.counts['ok']} usable, {self.skipped} skipped"]
        for reason in seen:
            names = ", ".join(self.examples.get(reason, []))
            row = f"  {reason:<{width}} {self.counts[reason]:>8}  {REASONS[reason]:<{meaning_width}}  {names}"
            lines.append(row.rstrip())
        return "\n".join(lines)


# ----------------------------------------------------------------------------- images


def load_image(src: bytes | Image.Image, name: str, report: DataReport, max_pixels: int = PIL_MAX_PIXELS) -> Image.Image | None:
    """Decode and normalise one image to RGB by the policy above; None (counted) if unusable."""
    img = src if isinstance(src, Image.Image) else _decode(src, name, report, max_pixels)
    if img is None:
        return None
    if img.width * img.height > max_pixels:  # for images handed over decoded (shapes, some `datasets`)
        report.skip("decompression_bomb", name)
        return None
    img = _apply_exif_orientation(img, name, report)
    return _to_rgb(img, name, report)


def _decode(data: bytes, name: str, report: DataReport, max_pixels: int) -> Image.Image | None:
    # Our own `max_pixels` check replaces PIL's warning, so the warning is silenced; PIL's
    # hard error (above 2 x MAX_IMAGE_PIXELS) is counted as the same thing.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                report.skip("decompression_bomb", name)
                return None
            img.load()  # important: decode now, so a truncated file fails here and not in training
    except Image.DecompressionBombError:
        report.skip("decompression_bomb", name)
    except UnidentifiedImageError:
        report.skip("not_an_image", name)
    except Exception as err:  # noqa: BLE001 (decoders raise OSError, SyntaxError, ValueError, ...)
        report.skip("truncated" if "truncat" in str(err).lower() else "unreadable", name)
    else:
        return img
    return None


def _apply_exif_orientation(img: Image.Image, name: str, report: DataReport) -> Image.Image:
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 (a malformed EXIF block must not cost the image)
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        report.note("exif_rotated", name)
        return ImageOps.exif_transpose(img)
    return img


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (I;16*, or I holding 16-bit values) -> 8-bit gray, scaled over the full range."""
    values = np.asarray(img).astype(np.float64)
    top = 65535.0 if values.max(initial=0) <= 65535 else float(2**31 - 1)
    gray = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _to_rgb(img: Image.Image, name: str, report: DataReport) -> Image.Image | None:
    mode, transparent = img.mode, "transparency" in img.info
    if mode == "RGB" and not transparent:
        return img
    if mode in ("RGBA", "RGBa") or (mode == "RGB" and transparent):
        report.note("converted_rgba", name)
        return _on_white(img)
    if mode in ("LA", "La") or (mode == "L" and transparent):
        report.note("converted_la", name)
        return _on_white(img)
    if mode in ("P", "PA"):
        report.note("converted_palette", name)
        return _on_white(img) if (mode == "PA" or transparent) else img.convert("RGB")
    if mode == "CMYK":
        report.note("converted_cmyk", name)
        return img.convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        report.note("converted_16bit", name)
        return _sixteen_to_8bit(img)
    if mode in ("L", "1"):
        report.note("converted_grayscale", name)
        return img.convert("RGB")
    if mode in ("YCbCr", "LAB", "HSV", "RGBX"):
        report.note("converted_other", name)
        return img.convert("RGB")
    report.skip("unsupported_mode", name)
    return None


# ----------------------------------------------------------------------------- captions


def _decode_caption(value: Any, name: str, report: DataReport) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8-sig")
        except UnicodeDecodeError:
            report.note("non_utf8_caption", name)
            return value.decode("utf-8", errors="replace")
    raise TypeError(f"{name}: a caption must be text, got {type(value).__name__}: {value!r:.80}")


def _captions(raw: Any, name: str, cfg: SourceConfig, report: DataReport) -> list[str] | None:
    """The item's caption alternatives; None (counted) if skipped by `no_caption`."""
    values = raw if isinstance(raw, (list, tuple)) else [raw]
    texts = [_decode_caption(v, name, report).strip() for v in values if v is not None]
    if any(texts):
        return [t for t in texts if t]
    reason = "empty_caption" if texts else "missing_caption"
    if cfg.no_caption == "skip":
        report.skip(reason, name)
        return None
    report.note(reason, name)
    return [""]


# ----------------------------------------------------------------------------- the source

Fetch = Callable[[], tuple[Any, Any]]  # -> (image: bytes | PIL image, raw caption(s) or None)


class _Skip(Exception):
    """Raised by a fetch for an item that is known to be unusable before decoding."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class _Item:
    id: str
    fetch: Fetch  # reads lazily, so a shard reads only its own items
    key: str | None = ""  # what the held-out split hashes (ldm.data.split): "" the id; None: no image, never held out

    @property
    def split_key(self) -> str | None:
        return self.id if self.key == "" else self.key


class Source:
    """Records of one source in a fixed order, bad items skipped and counted in `report`.

    `shard(rank, world)` keeps the items with index % world == rank (indices count every
    candidate item, good or bad), so the parts of several processes are disjoint and together
    cover the source. Streaming sources have no length; `SizedSource` adds `len()`.
    """

    def __init__(self, items: Callable[[], Iterable[_Item]], cfg: SourceConfig, report: DataReport | None = None,
                 transform: TransformConfig | None = None, rank: int = 0, world: int = 1, total: int | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"shard rank {rank} is not in [0, world={world})")
        self._items, self.cfg, self.transform, self.total = items, cfg, transform, total
        self.report = report if report is not None else DataReport()
        self.rank, self.world = rank, world

    def shard(self, rank: int, world: int) -> Source:
        """This source's part `rank` of `world` (composes: a shard of a shard is finer).

        The shard counts into the same report; each process of a multi-process job has its
        own and `DataReport.merge` adds them up.
        """
        if not 0 <= rank < world:
            raise ValueError(f"shard rank {rank} is not in [0, world={world})")
        return type(self)(self._items, self.cfg, self.report, self.transform,
                          self.rank + self.world * rank, self.world * world, self.total)

    def keys(self) -> Iterator[str]:
        """The split key (ldm.data.split) of every item that may be an image, in order, without reading one."""
        return (key for item in self._items() if (key := item.split_key) is not None)

    def where(self, keep_key: Callable[[str | None], bool], on_end: Callable[[], None] | None = None) -> Source:
        """The items whose split key `keep_key` accepts (None for an item that is no image), before
        shards are cut, counted into the same report; `on_end()` runs when an iteration has gone
        through every item."""
        items = functools.partial(_items_where, self._items, keep_key, on_end)
        total = None if self.total is None else sum(1 for item in self._items() if keep_key(item.split_key))
        return (Source if total is None else SizedSource)(items, self.cfg, self.report, self.transform, total=total)

    def __iter__(self) -> Iterator[Record]:
        for item in itertools.islice(self._items(), self.rank, None, self.world):
            record = self._load(item)
            if record is not None:
                yield record

    def _load(self, item: _Item) -> Record | None:
        try:
            image_src, raw_caption = item.fetch()
        except _Skip as skip:
            self.report.skip(skip.reason, item.id)
            return None
        except OSError:
            self.report.skip("unreadable", item.id)
            return None
        image = load_image(image_src, item.id, self.report, self.cfg.max_pixels)
        if image is None:
            return None
        captions = _captions(raw_caption, item.id, self.cfg, self.report)
        if captions is None or not self._size_ok(image, item.id):
            return None
        self.report.note("ok", item.id)
        return Record(item.id, image, captions, image.size)

    def _size_ok(self, image: Image.Image, name: str) -> bool:
        if self.transform is None or not is_too_small(image.size, target_size(image.size, self.transform)):
            return True
        if self.transform.small_policy == "skip":
            self.report.skip("too_small_skipped", name)
            return False
        self.report.note("too_small_upscaled", name)
        return True


def _items_where(items: Callable[[], Iterable[_Item]], keep_key: Callable[[str | None], bool],
                 on_end: Callable[[], None] | None) -> Iterator[_Item]:
    for item in items():
        if keep_key(item.split_key):
            yield item
    if on_end is not None:
        on_end()


class SizedSource(Source):
    """A Source whose number of candidate items is known: `len()` is this shard's count of
    items before skipping (an upper bound on the records it yields)."""

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.world))


def open_source(cfg: SourceConfig, report: DataReport | None = None,
                transform: TransformConfig | None = None) -> Source:
    """Open the source `cfg` describes; bad items are counted in `report`.

    With `transform`, images smaller than their target are skipped or kept by its
    small_policy (counted), and contradicting settings (flip on shapes) are refused.
    """
    if transform is not None:
        check_compatible(cfg, transform)
    opener = {"shapes": _shapes_items, "imagefolder": _folder_items, "hf": _hf_items, "webdataset": _tar_items}[cfg.kind]
    items, total = opener(cfg)
    return (Source if total is None else SizedSource)(items, cfg, report, transform, total=total)


Opened = tuple[Callable[[], Iterable[_Item]], int | None]  # (item iterator factory, count or None)


def _listed(items: list[_Item]) -> Opened:
    return functools.partial(iter, items), len(items)  # partials, not lambdas: a Source pickles (spawned workers)


def _caption_names(cfg: SourceConfig) -> list[str]:
    """Caption column names to look for: `caption_column`, and "caption" when it is the default "text"."""
    return [cfg.caption_column] + (["caption"] if cfg.caption_column == "text" else [])


def _caption_key(columns: Iterable[str], cfg: SourceConfig, where: str) -> str:
    """The caption column of a table whose columns are known; a clear error if it has none."""
    columns = list(columns)
    for key in _caption_names(cfg):
        if key in columns:
            return key
    raise ConfigError(f"{where} has no caption column {' or '.join(map(repr, _caption_names(cfg)))} "
                      f"(columns: {', '.join(columns)}); set source.caption_column")


def _caption_cell(row: dict, cfg: SourceConfig) -> Any:
    """The caption of a row whose columns are not known up front (None: missing, counted)."""
    return next((row[k] for k in _caption_names(cfg) if k in row), None)


# --- shapes


def _shapes_items(cfg: SourceConfig) -> Opened:
    from ldm.data.shapes import ShapesDataset

    dataset = ShapesDataset(size=cfg.size, resolution=cfg.resolution, seed=cfg.seed, num_objects=cfg.num_objects,
                            exclude=cfg.exclude, captions_per_image=cfg.captions_per_image,
                            two_object_fraction=cfg.two_object_fraction, attribute_dropout=cfg.attribute_dropout,
                            part_dropout=cfg.part_dropout)

    return _listed([_Item(f"shapes/{i}", functools.partial(_shapes_row, dataset, i)) for i in range(len(dataset))])


def _shapes_row(dataset, i: int) -> tuple[Image.Image, Any]:
    row = dataset[i]
    return row["image"], row["caption"]


# --- imagefolder

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# files at a folder's root that describe the dataset (a card, the held-out list that
# `python -m ldm.data.prepare` writes): neither images nor captions, so not counted as skipped
DATASET_FILES = ("README.md", "card.json", "heldout.txt")


def _folder_items(cfg: SourceConfig) -> Opened:
    """Every non-hidden file (opened by content), plus caption files without an image, as
    items in path order; the orphans are items too, so exactly one shard counts each."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise ConfigError(f"source.path {cfg.path!r} is not a directory")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and p.relative_to(root).as_posix() not in DATASET_FILES)
    metadata = _read_metadata(root, files, cfg)
    ext = cfg.caption_ext.lower()
    sidecars = {_stem(f): f for f in files if f.lower().endswith(ext)}
    images = {f for f in files if not f.lower().endswith(ext) and PurePosixPath(f).name not in METADATA_FILES}
    images |= set(metadata)  # listed but absent: counted as unreadable, not ignored
    image_stems = {_stem(f) for f in images}
    orphans = {f for stem, f in sidecars.items() if stem not in image_stems}
    fetch_image = functools.partial(_fetch_file, root, metadata, sidecars)
    return _listed([_Item(f, _orphan if f in orphans else functools.partial(fetch_image, f),
                          "" if f in metadata or _image_name(f) else None)
                    for f in sorted(images | orphans)])


def _image_name(rel_path: str) -> bool:
    """A file that may be held out (ldm.data.split): an image by its extension. Others (a README, a
    heldout.txt, a caption without image) are read with the training split and counted there."""
    return PurePosixPath(rel_path).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _stem(rel_path: str) -> str:
    return str(PurePosixPath(rel_path).with_suffix(""))


def _orphan() -> tuple[Any, Any]:
    raise _Skip("orphan_caption")


def _fetch_file(root: Path, metadata: dict[str, Any], sidecars: dict[str, str], rel: str) -> tuple[bytes, Any]:
    """The file's bytes and its caption: the metadata row, else the sidecar file's bytes."""
    data = (root / rel).read_bytes()
    if rel in metadata:
        return data, metadata[rel]
    sidecar = sidecars.get(_stem(rel))
    return data, (root / sidecar).read_bytes() if sidecar else None


def _read_metadata(root: Path, files: list[str], cfg: SourceConfig) -> dict[str, Any]:
    """{path relative to root: raw caption} from every metadata.jsonl / metadata.csv."""
    captions: dict[str, Any] = {}
    for meta in (f for f in files if PurePosixPath(f).name in METADATA_FILES):
        folder = PurePosixPath(meta).parent
        if (folder / ("metadata.csv" if meta.endswith(".jsonl") else "metadata.jsonl")).as_posix() in files:
            raise ConfigError(f"{root / folder} has both metadata.jsonl and metadata.csv; keep one")
        rows = _metadata_rows(root / meta)
        if rows:
            key = _caption_key(dict.fromkeys(k for row in rows for k in row), cfg, str(root / meta))
            captions.update(((folder / row["file_name"]).as_posix(), row.get(key)) for row in rows)
    return captions


def _metadata_rows(path: Path) -> list[dict]:
    """The rows of one metadata file, each a dict with a file_name; a clear error otherwise."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix == ".csv":
        numbered = enumerate(csv.DictReader(io.StringIO(text)), 2)  # line 1 is the header
    else:
        numbered = ((n, _json_line(path, n, line)) for n, line in enumerate(text.splitlines(), 1) if line.strip())
    rows = []
    for number, row in numbered:
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ConfigError(f"{path}:{number}: a row needs a file_name, got {row!r:.120}")
        rows.append(row)
    return rows


def _json_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{number}: not JSON: {err}") from None


# --- hf (`datasets`)


def _hf_items(cfg: SourceConfig) -> Opened:
    """Rows of a `datasets` dataset; images are read undecoded, so a bad one is counted by
    our decoder instead of raising inside `datasets`."""
    import datasets

    ds = _load_hf(cfg)
    columns = ds.column_names  # None for a streaming dataset of unknown features
    caption_key = None
    if columns is not None:
        if cfg.image_column not in columns:
            raise ConfigError(f"dataset {cfg.path!r} has no image column {cfg.image_column!r} "
                              f"(columns: {', '.join(columns)}); set source.image_column")
        caption_key = _caption_key(columns, cfg, f"dataset {cfg.path!r}")
        if isinstance(ds.features[cfg.image_column], datasets.Image):
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    parse = functools.partial(_hf_parse, cfg, caption_key)
    if isinstance(ds, datasets.IterableDataset):
        return functools.partial(_hf_stream_items, ds, parse), None
    return functools.partial(_hf_table_items, ds, parse), len(ds)


def _hf_table_items(ds, parse: Callable[[dict], tuple[Any, Any]]) -> Iterator[_Item]:
    for i in range(len(ds)):
        yield _Item(str(i), functools.partial(_hf_row, ds, i, parse))


def _hf_row(ds, i: int, parse: Callable[[dict], tuple[Any, Any]]) -> tuple[Any, Any]:
    return parse(ds[i])


def _hf_stream_items(ds, parse: Callable[[dict], tuple[Any, Any]]) -> Iterator[_Item]:
    for i, row in enumerate(ds):
        yield _Item(str(i), functools.partial(parse, row))


def _load_hf(cfg: SourceConfig):
    import datasets

    path = Path(cfg.path)
    saved = path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if not saved:
        return datasets.load_dataset(cfg.path, split=cfg.split, streaming=cfg.streaming)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ConfigError(f"{cfg.path} has no split {cfg.split!r} (splits: {', '.join(ds)}); set source.split")
        ds = ds[cfg.split]
    return ds.to_iterable_dataset() if cfg.streaming else ds


def _hf_parse(cfg: SourceConfig, caption_key: str | None, row: dict) -> tuple[Any, Any]:
    caption = row.get(caption_key) if caption_key else _caption_cell(row, cfg)
    return _image_value(row.get(cfg.image_column)), caption


def _image_value(value: Any) -> bytes | Image.Image:
    """bytes or a PIL image from what a `datasets` image cell holds."""
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return Path(value).read_bytes()
    if isinstance(value, (bytes, Image.Image)):
        return value
    raise _Skip("unreadable" if value is None else "not_an_image")


# --- webdataset tar shards


def _tar_items(cfg: SourceConfig) -> Opened:
    items: list[_Item] = []
    for shard in _tar_paths(cfg.path):
        items += _tar_groups(shard, cfg)
    return _listed(items)


def _tar_paths(path: str) -> list[str]:
    p = Path(path)
    shards = sorted(str(s) for s in p.glob("*.tar")) if p.is_dir() else ([path] if p.is_file() else sorted(glob.glob(path)))
    if not shards:
        raise ConfigError(f"source.path {path!r}: no .tar shards found (a .tar file, a folder of them, or a glob)")
    return shards


def _tar_groups(shard: str, cfg: SourceConfig) -> list[_Item]:
    """One item per sample key of an (uncompressed) tar, read by offset on demand.

    A shard whose headers break off keeps the samples before the break and adds one
    `unreadable` item for the rest.
    """
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    broken = False
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile():
                    folder, _, base = member.name.rpartition("/")
                    key, _, ext = base.partition(".")
                    groups.setdefault(f"{folder}/{key}" if folder else key, {})[ext.lower()] = member
    except (tarfile.TarError, OSError):
        broken = True
    name = Path(shard).name
    # the split key is the sample's __key__ alone, so re-sharding the tars keeps the split
    items = [_Item(f"{name}/{key}", functools.partial(_fetch_sample, shard, members, cfg),
                   key if any(e in IMAGE_EXTENSIONS for e in members) else None)
             for key, members in groups.items()]
    return items + [_Item(f"{name}:<rest of the shard>", _unreadable, None)] if broken else items


def _unreadable() -> tuple[Any, Any]:
    raise _Skip("unreadable")


def _read_member(shard: str, member: tarfile.TarInfo) -> bytes:
    with open(shard, "rb") as f:
        f.seek(member.offset_data)
        data = f.read(member.size)
    if len(data) != member.size:
        raise _Skip("truncated")
    return data


def _fetch_sample(shard: str, members: dict[str, tarfile.TarInfo], cfg: SourceConfig) -> tuple[bytes, Any]:
    caption_ext = cfg.caption_ext.lstrip(".").lower()
    image_ext = next((e for e in members if e in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        raise _Skip("orphan_caption" if caption_ext in members or "json" in members else "not_an_image")
    if caption_ext in members:
        caption = _read_member(shard, members[caption_ext])
    elif "json" in members:
        caption = _json_caption(_read_member(shard, members["json"]), cfg)
    else:
        caption = None
    return _read_member(shard, members[image_ext]), caption


def _json_caption(data: bytes, cfg: SourceConfig) -> Any:
    try:
        meta = json.loads(data)
    except ValueError:
        raise _Skip("unreadable") from None
    return _caption_cell(meta, cfg) if isinstance(meta, dict) else None
