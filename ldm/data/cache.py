"""Stage 2: the latent cache, the contract between the VAE (stage 1) and the U-Net (stage 3).

Layout of a cache directory:

    manifest.json             what made it (below); written last, so its presence means complete
    encoding.json             the settings of an encode in progress (removed when it completes)
    train-00000.safetensors   shard k: records [k * shard_size, (k + 1) * shard_size) of the split
    eval-00000.safetensors    held-out records (chosen by key hash, ldm.data.split), same format
    text.safetensors          optional (EncodeConfig.text): the text encoder's output per caption
    encode.jsonl              one line per shard written: process, records, seconds, images/s

A shard holds, per latent size HxW (one size, or one per aspect bucket):
    mean/HxW, std/HxW   float16 (n, C, H, W): the VAE posterior's mean and std, *unscaled*
    index/HxW           int64 (n,): row of each latent in the shard's record order
and, when the transform flips: flip_mean/HxW, flip_std/HxW, the posterior of the mirrored image.
Its safetensors metadata holds `records`: a JSON list of {id, captions, meta} in record order;
meta is the crop and bucket: original_size, crop_top_left, target_size (SDXL's names, (h, w)).

text.safetensors holds `embeddings`, float16 (N, L, D): the frozen text encoder's output for
every unique caption of the cache and for "" (the unconditional prompt), in the order of the
JSON list `captions` in its metadata. The manifest's `text` entry names the encoder (weights
hash, clip_skip, tokenizer padding) so that stage 3 uses it only with the same encoder.

Stage 3 draws z = mean + std * noise afresh every time it sees an image (`mode` uses the mean)
and applies the manifest's scaling, so one cache serves every epoch without freezing a single
posterior sample (as DiT's feature extraction does). It memory-maps the shards rather than
loading them (`LatentCache`), so a cache may be larger than RAM.

The manifest records the format version, the VAE weights' hash, its scaling and shift, the
resolution, bucket, crop and flip settings, the source and a fingerprint of its files, the
held-out split (`split`: its rule and settings, the number of held-out keys and a SHA-256 of
them, see ldm.data.split), the encode precision, the shard size and the counts.
`open_cache(..., expect=...)` refuses a cache that does not match the run and says what
differs; an encode refuses to add to a directory made with other settings unless
overwrite=true, and refuses to hold out other images than the VAE's run did (ldm.data.split). Shards are written atomically (temp file + rename),
and an interrupted encode resumes by skipping the shards that exist. With several processes
(accelerate launch) process r encodes the shards k with k % world == r; a shard's batches depend
on its own records only, so the result is the same as one process's.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import mmap
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save

from ldm.config import ConfigError, require
from ldm.data.captions import CaptionConfig
from ldm.data.images import DataConfig, iter_prepared, plan_split
from ldm.data.sources import DataReport, SourceConfig
from ldm.data.split import HeldOut, upstream_split_problem
from ldm.models.conditioning import TextEncoderConfig
from ldm.safetensors_io import open_safetensors, unreadable_safetensors

FORMAT = "ldm-latent-cache"
VERSION = 3  # 2: source fingerprint, encode precision, optional text.safetensors; 3: held out by key hash, `split`
MANIFEST, PENDING, TEXT_FILE, LOG_FILE = "manifest.json", "encoding.json", "text.safetensors", "encode.jsonl"
SPLITS = ("train", "eval")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREFETCH = 64  # prepared images the reading thread may run ahead of the VAE


@dataclasses.dataclass
class EncodeConfig:
    vae: str = "runs/vae/vae"        # AutoencoderKL dir (stage 1 output) or an SD pipeline dir
    out_dir: str = "runs/latents"    # the cache directory
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    text: TextEncoderConfig | None = None  # set: also cache this (frozen) text encoder's output per unique caption
    shard_size: int = 1024           # records per shard (the unit of atomic write and resume)
    batch_size: int = 32             # images per VAE forward (with flip, each goes in twice: as is and mirrored)
    dtype: str = "auto"              # auto (bf16 on CUDA, else fp32) | fp32 | bf16 | fp16
    overwrite: bool = False          # true: delete a cache made with other settings; false: refuse

    def validate(self) -> None:
        require(self.data.captions == CaptionConfig(),
                "data.captions: the cache keeps captions as they are; shuffle tags or add a prefix in stage 3, "
                "whose captions.* settings apply them as it trains")
        require(self.shard_size > 0, "shard_size must be > 0")
        require(self.batch_size > 0, "batch_size must be > 0")
        require(self.dtype == "auto" or self.dtype in DTYPES, f"dtype {self.dtype!r} is not auto|{'|'.join(DTYPES)}")


class CacheMismatchError(ValueError):
    """The cache on disk was made by another VAE or other settings than this run expects."""


def resolve_dtype(name: str, device: torch.device) -> str:
    """The encode precision's name: `auto` is bf16 on CUDA (fast, and safe for the VAE encoder), else fp32."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def expected_manifest(cfg: EncodeConfig, vae, dtype: str = "fp32", heldout: HeldOut | None = None) -> dict:
    """The fields that must match between a cache and the encode that adds to it.

    `split` is the held-out set's record (ldm.data.split); for a stream, whose held-out keys are
    known only after a pass, just its rule and settings (the manifest gets the full record).
    """
    from ldm.models.vae import downsample_factor, latent_scale, weights_hash

    scale, shift = latent_scale(vae)
    split = (heldout if heldout is not None else plan_split(cfg.data)).record()
    return {
        "format": FORMAT,
        "version": VERSION,
        "vae_hash": weights_hash(vae),
        "scaling_factor": scale,
        "shift_factor": shift,
        "downsample_factor": downsample_factor(vae),
        "latent_channels": int(vae.config.latent_channels),
        "transform": dataclasses.asdict(cfg.data.transform),
        "source": dataclasses.asdict(cfg.data.source),
        "source_fingerprint": source_fingerprint(cfg.data.source),
        "split": {k: v for k, v in split.items() if v is not None},
        "max_images": cfg.data.max_images,
        "shard_size": cfg.shard_size,
        "encode_dtype": dtype,
    }


def source_fingerprint(source: SourceConfig) -> str | None:
    """A hash of the names, sizes and modification times of the source's local files.

    With it a re-encode notices images or captions added, removed or edited since the cache
    was made: a stale cache is worse than a refused one. None where the config alone fixes
    the data (the synthetic shapes, a `datasets` hub name).
    """
    files = _source_files(source)
    if not files:
        return None
    h = hashlib.sha256()
    for name, path in files:
        st = path.stat()
        h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _source_files(source: SourceConfig) -> list[tuple[str, Path]]:
    """(name, path) of every non-hidden file under source.path (a folder, a file or a glob)."""
    if source.kind == "shapes":
        return []
    root = Path(source.path)
    if root.is_dir():
        rel = ((p.relative_to(root), p) for p in root.rglob("*"))
        return sorted((r.as_posix(), p) for r, p in rel if p.is_file() and not any(s.startswith(".") for s in r.parts))
    return sorted((p, Path(p)) for p in glob.glob(source.path) if Path(p).is_file())


def describe_mismatch(found: dict, expected: dict) -> list[str]:
    """One line per expected field (one level into dicts) that `found` lacks or holds otherwise."""
    diffs = []
    for key, want in expected.items():
        have = found.get(key, "<missing>")
        if isinstance(want, dict) and isinstance(have, dict):
            diffs += [f"{key}.{k}: cache has {have.get(k, '<missing>')!r}, run expects {v!r}"
                      for k, v in want.items() if have.get(k) != v]
        elif have != want:
            diffs.append(f"{key}: cache has {have!r}, run expects {want!r}")
    return diffs


def text_identity(text_encoder, tokenizer, clip_skip: int) -> dict:
    """What fixes a caption's embedding: the encoder's weights, the layer taken, the padding."""
    from ldm.models.vae import weights_hash

    return {"encoder_hash": weights_hash(text_encoder), "clip_skip": clip_skip,
            "pad_token": tokenizer.pad_token, "max_length": tokenizer.model_max_length}


def _shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.safetensors"


# ----------------------------------------------------------------------------- writing


def encode_dataset(cfg: EncodeConfig, accelerator=None) -> Path:
    """Encode the train and eval splits into the cache at cfg.out_dir; resumes; one or many processes."""
    from accelerate import Accelerator

    from ldm.models.vae import load_vae

    accelerator = accelerator or Accelerator()
    out_dir = Path(cfg.out_dir)
    dtype = resolve_dtype(cfg.dtype, accelerator.device)
    vae = load_vae(cfg.vae).eval().requires_grad_(False)
    # important: the hash is taken before the cast, so it is the hash of the weights stage 3 loads
    heldout = plan_split(cfg.data)  # one plan for both passes: a stream's held-out keys are collected as they pass
    expected = expected_manifest(cfg, vae, dtype, heldout)
    # the VAE's run (vae=<run>/vae): stage 3 must not evaluate on images the VAE trained on
    problem = upstream_split_problem(Path(cfg.vae).parent, expected["source"], expected["split"], "this encode")
    if problem:
        raise ConfigError(problem)
    vae = _for_encoding(vae, accelerator.device, DTYPES[dtype])

    if accelerator.is_main_process:
        _prepare_dir(out_dir, expected, cfg.overwrite)
    accelerator.wait_for_everyone()
    # Every process reads the whole source (a record's index counts the usable records before
    # it), so the main process's report alone is complete: merging would count each item N times.
    report = DataReport()
    counts = {split: _encode_split(cfg, vae, split, out_dir, accelerator, report, heldout) for split in SPLITS}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = {**expected, "split": heldout.record(), "splits": _check_shards(out_dir, counts, cfg.shard_size),
                    "report": report.to_dict(), "processes": accelerator.num_processes}
        if cfg.text is not None:
            manifest["text"] = _cache_text(cfg.text, out_dir, manifest["splits"], cfg.batch_size, accelerator.device)
        _write_json_atomic(out_dir / MANIFEST, manifest)
        (out_dir / PENDING).unlink(missing_ok=True)
        print(f"latent cache: {counts['train']} train + {counts['eval']} eval images in {out_dir}")
        print(report.summary())
    accelerator.wait_for_everyone()
    return out_dir


def _for_encoding(vae, device: torch.device, dtype: torch.dtype):
    vae = vae.to(device)
    if dtype != vae.dtype:
        vae = vae.to(dtype=dtype)
    if device.type == "cuda":  # cuDNN's convolutions are faster in NHWC, above all in bf16
        vae = vae.to(memory_format=torch.channels_last)
    return vae


def _prepare_dir(out_dir: Path, expected: dict, overwrite: bool) -> None:
    """Refuse (or with overwrite, clear) a directory holding a cache made otherwise; note what we encode."""
    previous = next((json.loads(p.read_text()) for p in (out_dir / MANIFEST, out_dir / PENDING) if p.exists()), None)
    if previous is not None:
        diffs = describe_mismatch(previous, expected)
    else:
        diffs = ["shards with neither manifest.json nor encoding.json: made with unknown settings"
                 ] if any(out_dir.glob("*.safetensors")) else []
    if diffs and not overwrite:
        raise CacheMismatchError(
            f"{out_dir} holds a latent cache made with other settings:\n  " + "\n  ".join(diffs)
            + "\nUse another out_dir, or pass overwrite=true to delete it and re-encode.")
    if diffs:
        for f in [*out_dir.glob("*.safetensors"), out_dir / MANIFEST, out_dir / LOG_FILE]:
            f.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.glob(".tmp-*"):  # left by a killed encode; no other process writes yet
        f.unlink()
    _write_json_atomic(out_dir / PENDING, expected)


def _encode_split(cfg: EncodeConfig, vae, split: str, out_dir: Path, accelerator, report: DataReport, heldout: HeldOut) -> int:
    """Encode this process's missing shards of `split`; returns the split's record count."""
    rank, world = accelerator.process_index, accelerator.num_processes
    seen = 0

    def mine_and_missing(index: int) -> bool:
        nonlocal seen
        seen = index + 1  # iter_prepared asks about every record of the split, in order
        k = index // cfg.shard_size
        return k % world == rank and not (out_dir / _shard_name(split, k)).exists()

    desc = f"encode {split}" if accelerator.is_local_main_process else ""
    shard, current = None, None
    for index, image, captions, rid, meta in _prefetch(iter_prepared(cfg.data, split, report, mine_and_missing, desc, heldout), PREFETCH):
        k = index // cfg.shard_size
        if k != current:
            if shard is not None:
                shard.write(out_dir / _shard_name(split, current), rank)
            shard, current = _Shard(vae, cfg.batch_size, cfg.data.transform.flip), k
        shard.add(image, {"id": rid, "captions": captions, "meta": _jsonable(meta)})
    if shard is not None:
        shard.write(out_dir / _shard_name(split, current), rank)
    return seen


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Yield from `items` as produced by a background thread up to `depth` ahead.

    Reading, decoding and resizing (PIL, on the CPU) then overlap the VAE's forward passes;
    both PIL and torch release the GIL for their heavy work.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def produce() -> None:
        try:
            for item in items:
                buffer.put(item)
        except BaseException as err:  # noqa: BLE001 (handed to the consumer, which raises it)
            buffer.put(err)
        else:
            buffer.put(end)

    threading.Thread(target=produce, daemon=True, name="cache-reader").start()
    while (item := buffer.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


class _Shard:
    """One shard's records as they arrive, encoded a batch at a time per image size.

    Only the posteriors stay in memory, not a shard of full-size images; and the batches are
    fixed by the shard's own records, so any number of processes gives the same tensors.
    """

    def __init__(self, vae, batch_size: int, flip: bool):
        self.vae, self.batch_size, self.flip = vae, batch_size, flip
        self.records: list[dict] = []
        self.waiting: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}  # image size -> (row, image)
        self.parts: dict[str, list[torch.Tensor]] = {}  # "mean/HxW" -> encoded batches
        self.t0 = time.time()

    def add(self, image: torch.Tensor, record: dict) -> None:
        size = tuple(image.shape[-2:])
        self.waiting.setdefault(size, []).append((len(self.records), image))
        self.records.append(record)
        if len(self.waiting[size]) == self.batch_size:
            self._encode(self.waiting.pop(size))

    def _encode(self, batch: list[tuple[int, torch.Tensor]]) -> None:
        rows, images = zip(*batch)
        x = torch.stack(images)
        if self.flip:  # both mirror images in one forward pass
            x = torch.cat([x, x.flip(-1)])
        mean, std = _posterior(self.vae, x)
        n, key = len(rows), f"{mean.shape[-2]}x{mean.shape[-1]}"
        fields = {"mean": mean[:n], "std": std[:n], "index": torch.tensor(rows, dtype=torch.int64)}
        if self.flip:
            fields |= {"flip_mean": mean[n:], "flip_std": std[n:]}
        for field, tensor in fields.items():
            self.parts.setdefault(f"{field}/{key}", []).append(tensor)

    def write(self, path: Path, rank: int) -> None:
        """Encode what waits, write the shard atomically, and log its throughput."""
        for size in list(self.waiting):
            self._encode(self.waiting.pop(size))
        tensors = {name: torch.cat(parts) for name, parts in self.parts.items()}
        _save_atomic(path, tensors, {"records": json.dumps(self.records)})
        seconds = time.time() - self.t0
        line = {"shard": path.name, "process": rank, "records": len(self.records), "seconds": round(seconds, 3),
                "images_per_s": round(len(self.records) / max(seconds, 1e-9), 2)}
        with open(path.parent / LOG_FILE, "a") as f:  # one short append per line: whole lines with many writers
            f.write(json.dumps(line) + "\n")


@torch.no_grad()
def _posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and std, float16 on the CPU (the cache's storage type)."""
    param = next(vae.parameters())
    x = images.to(device=param.device, dtype=param.dtype)
    if param.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    dist = vae.encode(x).latent_dist
    return dist.mean.half().cpu(), dist.std.half().cpu()


def _jsonable(meta: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name, then rename it into place.

    Bytes through open() rather than save_file(), whose files are private (0600) whatever the
    umask: a cache on shared storage must be readable by the other users of the cluster.
    """
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # important: atomic; a killed encode never leaves half a file


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _check_shards(out_dir: Path, counts: dict[str, int], shard_size: int) -> dict:
    """Each split's shards, checked against the record counts the source gives now.

    A shard left by an encode of a source that has changed since (records added or removed
    where the fingerprint cannot see it, as in a hub dataset) holds another number of records
    than its place in the split calls for, or there is one shard too many or too few: refuse
    rather than mix old and new records.
    """
    splits = {}
    for split, count in counts.items():
        names = [_shard_name(split, k) for k in range(math.ceil(count / shard_size))]
        found = sorted(p.name for p in out_dir.glob(f"{split}-*.safetensors"))
        if found != names:
            raise CacheMismatchError(
                f"{out_dir}: the {split} split now has {count} records, so {len(names)} shards are expected, "
                f"found {len(found)} ({', '.join(sorted(set(found) ^ set(names))[:4])} differ): the source "
                "changed since they were written; re-encode with overwrite=true")
        for k, name in enumerate(names):
            held, want = len(_records(out_dir / name)), min(shard_size, count - k * shard_size)
            if held != want:
                raise CacheMismatchError(
                    f"{out_dir / name} holds {held} records where the source now gives {want}: the source "
                    "changed since it was written; re-encode with overwrite=true")
        splits[split] = {"shards": names, "count": count}
    return splits


def _cache_text(cfg: TextEncoderConfig, out_dir: Path, splits: dict, batch_size: int, device: torch.device) -> dict:
    """Encode every unique caption of the cache, and "", once; returns the manifest's `text` entry."""
    from ldm.models.conditioning import load_text
    from ldm.models.text import encode_prompts

    text_encoder, tokenizer = load_text(cfg)
    identity = text_identity(text_encoder, tokenizer, cfg.clip_skip)
    captions = sorted({""} | {c for split in splits.values() for name in split["shards"]
                              for record in _records(out_dir / name) for c in record["captions"]})
    path = out_dir / TEXT_FILE
    if _text_file_header(path) != (captions, identity):  # else a resumed encode already wrote it
        text_encoder.to(device)
        with torch.no_grad():
            chunks = [encode_prompts(text_encoder, tokenizer, captions[s : s + batch_size], clip_skip=cfg.clip_skip).half().cpu()
                      for s in range(0, len(captions), batch_size)]
        _save_atomic(path, {"embeddings": torch.cat(chunks)},
                     {"captions": json.dumps(captions), "identity": json.dumps(identity)})
    return {**identity, "file": TEXT_FILE, "count": len(captions)}


def _text_file_header(path: Path) -> tuple[list[str], dict] | None:
    if not path.exists():
        return None
    with open_safetensors(path) as f:
        meta = f.metadata()
    return json.loads(meta["captions"]), json.loads(meta["identity"])


def _records(path: Path) -> list[dict]:
    with open_safetensors(path) as f:
        return json.loads(f.metadata()["records"])


# ----------------------------------------------------------------------------- reading


class LatentCache:
    """One split of a cache: posterior parameters grouped by latent size, and the captions.

    The shards are memory-mapped, not loaded: a batch reads its own rows from disk (or from the
    page cache), so a cache larger than RAM trains, and the processes of one machine share one
    copy of the pages instead of holding one each.
    """

    def __init__(self, manifest: dict, groups: dict, captions: list[list[str]], ids: list[str], cache_dir: Path):
        # groups: "HxW" -> {"items": int64 (n,), "parts": one {field: array} per shard with latents of that size}
        self.manifest, self.groups, self.captions, self.ids = manifest, groups, captions, ids
        self.cache_dir = Path(cache_dir)
        self._text = None  # (open text.safetensors, caption -> row), opened on first use
        self.locate = {}  # item i -> (size key, part, row in that part)
        for key, g in groups.items():
            for part, fields in enumerate(g["parts"]):
                for row, item in enumerate(fields["index"].tolist()):
                    self.locate[item] = (key, part, row)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def scaling(self) -> tuple[float, float]:
        return self.manifest["scaling_factor"], self.manifest["shift_factor"]

    def size_groups(self) -> dict[str, list[int]]:
        """Items by latent size "HxW": a batch must come from one group."""
        return {key: g["items"].tolist() for key, g in self.groups.items()}

    def posterior(self, indices: list[int], flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (mean, std), float32 and unscaled, of items of one latent size.

        `flip` (bool per item) takes the mirrored image's posterior for the items it marks.
        """
        keys = {self.locate[i][0] for i in indices}
        if len(keys) != 1:
            raise ValueError(f"a batch must come from one latent size, got {sorted(keys)}")
        parts = self.groups[keys.pop()]["parts"]
        where = [self.locate[i][1:] for i in indices]
        mirrored = [False] * len(indices) if flip is None else flip.tolist()
        if any(mirrored) and "flip_mean" not in parts[0]:
            raise ValueError(f"flip asked for, but the cache at {self.cache_dir} was encoded with "
                             "transform.flip=false; re-encode with flip=true, or do not flip")
        prefix = ["flip_" if m else "" for m in mirrored]
        return (self._gather(parts, [p + "mean" for p in prefix], where),
                self._gather(parts, [p + "std" for p in prefix], where))

    @staticmethod
    def _gather(parts: list[dict], fields: list[str], where: list[tuple[int, int]]) -> torch.Tensor:
        """Item k's row of field fields[k] at where[k] = (part, row), in that order: one read per
        shard and field."""
        reads: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
        for position, (field, (part, row)) in enumerate(zip(fields, where)):
            positions, rows = reads.setdefault((part, field), ([], []))
            positions.append(position)
            rows.append(row)
        out = torch.empty((len(where), *parts[where[0][0]][fields[0]].shape[1:]))
        for (part, field), (positions, rows) in reads.items():
            out[positions] = _as_tensor(parts[part][field][rows]).float()
        return out

    def latents(self, indices: list[int], generator: torch.Generator | list[torch.Generator] | None = None,
                mode: bool = False, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents for items of one size: a fresh posterior sample (or, with `mode`, the mean)."""
        mean, std = self.posterior(indices, flip)
        z = mean if mode else mean + std * randn_tensor(mean.shape, generator=generator)  # a list: item i from generator i
        scale, shift = self.scaling
        return (z - shift) * scale

    def text_matches(self, identity: dict) -> bool:
        """True when the cache holds text embeddings made by this encoder (see `text_identity`)."""
        entry = self.manifest.get("text")
        return entry is not None and all(entry.get(k) == v for k, v in identity.items())

    def text_embeddings(self, captions: list[str]) -> torch.Tensor | None:
        """The cached (B, L, D) float32 text embeddings of these strings, or None when the cache
        has no text or lacks one of them (a prefix, shuffled tags): then encode them instead.

        Check `text_matches` once first: this does not know which encoder the caller uses.
        """
        if "text" not in self.manifest:
            return None
        if self._text is None:
            handle = open_safetensors(self.cache_dir / self.manifest["text"]["file"])
            self._text = handle, {c: i for i, c in enumerate(json.loads(handle.metadata()["captions"]))}
        handle, row_of = self._text
        if any(c not in row_of for c in captions):
            return None
        rows = handle.get_slice("embeddings")  # reads only the rows asked for
        return torch.stack([rows[row_of[c] : row_of[c] + 1][0] for c in captions]).float()


_NUMPY = {"F16": np.float16, "F32": np.float32, "I64": np.int64}  # the safetensors dtypes a shard holds


def map_safetensors(path: str | Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors) of a safetensors file, the tensors as read-only views of one memory map.

    Nothing is read until an array is indexed; `_as_tensor(array[rows])` copies just those rows.
    """
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= os.fstat(fh.fileno()).st_size - 8:
                raise ValueError(f"a header of {size} bytes does not fit the file")
            header = json.loads(fh.read(size))
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError as err:  # a header that is no JSON, an empty file
        raise unreadable_safetensors(path, err) from err
    if hasattr(mmap, "MADV_WILLNEED"):  # Linux, macOS: the OS reads the file ahead in the background
        mapped.madvise(mmap.MADV_WILLNEED)
    metadata = header.pop("__metadata__", {})
    arrays = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if info["dtype"] not in _NUMPY:
            raise ValueError(f"{path}: tensor {name!r} is {info['dtype']}; a cache shard holds {', '.join(_NUMPY)}")
        dtype = np.dtype(_NUMPY[info["dtype"]])
        try:
            array = np.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + size + start)
        except ValueError as err:  # the file ends before the data the header lists
            raise unreadable_safetensors(path, err) from err
        arrays[name] = array.reshape(info["shape"])
    return metadata, arrays


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))  # copies a view of the (read-only) map


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        hint = (" (an encode was interrupted: run the encode command again to finish it)"
                if (Path(cache_dir) / PENDING).exists() else "")
        raise FileNotFoundError(f"no latent cache at {cache_dir}: manifest.json is missing{hint}")
    return json.loads(path.read_text())


def open_cache(cache_dir: str | Path, split: str = "train", expect: dict | None = None) -> LatentCache:
    """Open a split (memory-mapped); with `expect` (e.g. {"vae_hash": ...}), refuse a cache that differs."""
    manifest = read_manifest(cache_dir)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheMismatchError(
            f"{cache_dir}: not a {FORMAT} v{VERSION} cache (found {manifest.get('format')!r} "
            f"v{manifest.get('version')!r}); re-encode it (python encode.py --config ... overwrite=true)")
    if expect:
        diffs = describe_mismatch(manifest, expect)
        if diffs:
            raise CacheMismatchError(
                f"the latent cache {cache_dir} does not match this run:\n  " + "\n  ".join(diffs)
                + "\nRe-encode it for this VAE and these settings (python encode.py --config ... overwrite=true), "
                "or point the run at the matching cache.")
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in the cache at {cache_dir}; it has {sorted(manifest['splits'])}")
    groups: dict[str, dict] = {}
    captions, ids = [], []
    for name in manifest["splits"][split]["shards"]:
        metadata, arrays = map_safetensors(Path(cache_dir) / name)
        by_size: dict[str, dict] = {}
        for key, array in arrays.items():
            field, size = key.split("/")
            by_size.setdefault(size, {})[field] = array
        for size, fields in by_size.items():
            fields["index"] = _as_tensor(fields["index"]) + len(captions)  # small: read now, as item numbers
            groups.setdefault(size, {"parts": []})["parts"].append(fields)
        records = json.loads(metadata["records"])
        captions += [r["captions"] for r in records]
        ids += [r["id"] for r in records]
    for g in groups.values():
        g["items"] = torch.cat([fields["index"] for fields in g["parts"]])
    return LatentCache(manifest, groups, captions, ids, Path(cache_dir))
