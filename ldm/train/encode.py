"""Stage 2: encode a dataset into a latent cache, with the VAE of stage 1.

The cache's format, its one writer of each file and its one reader live in `ldm.data.cache`;
this module is the encoding loop: it reads and prepares the images (ldm.data.images), runs the
VAE encoder over them in batches, and hands each finished shard to the cache's writer.

An interrupted encode resumes by skipping the shards that exist. With several processes
(accelerate launch) process r encodes the shards k with k % world == r; a shard's batches depend
on its own records only, so the result is the same as one process's. Reading and decoding images
(PIL, a background thread) overlaps the VAE's forward passes.

A single file given as `vae=` or `text.encoder=` is read from its imported directory
(`ldm.single_file.resolve_models`); the config keeps its path.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from ldm.config import ConfigError, require
from ldm.data.cache import (LOG_FILE, SPLITS, TEXT_FILE, check_shards, expected_manifest, prepare_dir, shard_name,
                            shard_records, text_file_header, text_identity, write_manifest, write_shard,
                            write_text_embeddings)
from ldm.data.captions import CaptionConfig
from ldm.data.images import DataConfig, iter_prepared, plan_split
from ldm.data.sources import DataReport
from ldm.data.split import HeldOut, upstream_split_problem
from ldm.models.conditioning import TextEncoderConfig, load_text
from ldm.models.text import encode_prompts
from ldm.models.vae import load_vae
from ldm.single_file import resolve_models

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


def resolve_dtype(name: str, device: torch.device) -> str:
    """The encode precision's name: `auto` is bf16 on CUDA (fast, and safe for the VAE encoder), else fp32."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def encode_dataset(cfg: EncodeConfig, accelerator=None) -> Path:
    """Encode the train and eval splits into the cache at cfg.out_dir; resumes; one or many processes."""
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    out_dir = Path(cfg.out_dir)
    dtype = resolve_dtype(cfg.dtype, accelerator.device)
    models = resolve_models(cfg, "vae", "text.encoder")  # a single file: its imported directory
    vae = load_vae(models.vae).eval().requires_grad_(False)
    # important: the hash is taken before the cast, so it is the hash of the weights stage 3 loads
    heldout = plan_split(cfg.data)  # one plan for both passes: a stream's held-out keys are collected as they pass
    expected = expected_manifest(cfg.data, cfg.shard_size, vae, dtype, heldout)
    # the VAE's run (vae=<run>/vae): stage 3 must not evaluate on images the VAE trained on
    problem = upstream_split_problem(Path(cfg.vae).parent, expected["source"], expected["split"], "this encode")
    if problem:
        raise ConfigError(problem)
    vae = _for_encoding(vae, accelerator.device, DTYPES[dtype])

    if accelerator.is_main_process:
        prepare_dir(out_dir, expected, cfg.overwrite)
    accelerator.wait_for_everyone()
    # Every process reads the whole source (a record's index counts the usable records before
    # it), so the main process's report alone is complete: merging would count each item N times.
    report = DataReport()
    counts = {split: _encode_split(cfg, vae, split, out_dir, accelerator, report, heldout) for split in SPLITS}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = {**expected, "split": heldout.record(), "splits": check_shards(out_dir, counts, cfg.shard_size),
                    "report": report.to_dict(), "processes": accelerator.num_processes}
        if models.text is not None:
            manifest["text"] = _cache_text(models.text, out_dir, manifest["splits"], cfg.batch_size, accelerator.device)
        write_manifest(out_dir, manifest)
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


def _encode_split(cfg: EncodeConfig, vae, split: str, out_dir: Path, accelerator, report: DataReport, heldout: HeldOut) -> int:
    """Encode this process's missing shards of `split`; returns the split's record count."""
    rank, world = accelerator.process_index, accelerator.num_processes
    seen = 0

    def mine_and_missing(index: int) -> bool:
        nonlocal seen
        seen = index + 1  # iter_prepared asks about every record of the split, in order
        k = index // cfg.shard_size
        return k % world == rank and not (out_dir / shard_name(split, k)).exists()

    desc = f"encode {split}" if accelerator.is_local_main_process else ""
    shard, current = None, None
    for index, image, captions, rid, meta in _prefetch(iter_prepared(cfg.data, split, report, mine_and_missing, desc, heldout), PREFETCH):
        k = index // cfg.shard_size
        if k != current:
            if shard is not None:
                shard.write(out_dir / shard_name(split, current), rank)
            shard, current = _Shard(vae, cfg.batch_size, cfg.data.transform.flip), k
        shard.add(image, {"id": rid, "captions": captions, "meta": _jsonable(meta)})
    if shard is not None:
        shard.write(out_dir / shard_name(split, current), rank)
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
        write_shard(path, tensors, self.records)
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


def _cache_text(cfg: TextEncoderConfig, out_dir: Path, splits: dict, batch_size: int, device: torch.device) -> dict:
    """Encode every unique caption of the cache, and "", once; returns the manifest's `text` entry."""
    text_encoder, tokenizer = load_text(cfg)
    identity = text_identity(text_encoder, tokenizer, cfg.clip_skip)
    captions = sorted({""} | {c for split in splits.values() for name in split["shards"]
                              for record in shard_records(out_dir / name) for c in record["captions"]})
    path = out_dir / TEXT_FILE
    if text_file_header(path) != (captions, identity):  # else a resumed encode already wrote it
        text_encoder.to(device)
        with torch.no_grad():
            chunks = [encode_prompts(text_encoder, tokenizer, captions[s : s + batch_size], clip_skip=cfg.clip_skip).half().cpu()
                      for s in range(0, len(captions), batch_size)]
        write_text_embeddings(path, torch.cat(chunks), captions, identity)
    return {**identity, "file": TEXT_FILE, "count": len(captions)}
