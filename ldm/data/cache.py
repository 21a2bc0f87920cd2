"""Stage 2: the latent cache, the contract between the VAE (stage 1) and the U-Net (stage 3).

Layout of a cache directory:

    manifest.json             what made it (below); written last, so its presence means complete
    train-00000.safetensors   one shard: `shard_size` consecutive records of the split
    eval-00000.safetensors    held-out records, same format

A shard holds, per latent size HxW (one size, or one per aspect bucket):
    mean/HxW, std/HxW   float16 (n, C, H, W): the VAE posterior's mean and std, *unscaled*
    index/HxW           int64 (n,): position of each row in the shard's record order
and, when the transform flips: flip_mean/HxW, flip_std/HxW for the mirrored image.
Its safetensors metadata holds `records`: a JSON list of {id, captions, meta} in record order.

Stage 3 draws z = mean + std * noise afresh every time it sees an image (a `mode` option uses
the mean) and applies the manifest's scaling, so one cache serves every epoch without
freezing a single posterior sample (as DiT's feature extraction does).

The manifest records the VAE weights' hash, its scaling and shift, the resolution, bucket,
crop and flip settings and the source; `open_cache(..., expect=...)` refuses a cache that does
not match the run and says what differs. Shards are written atomically (temp file + rename),
and an interrupted encode resumes by skipping shards that exist; with several processes
(accelerate launch) each process encodes shards k with k % world == rank, so the result is
the same as one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ldm.config import require
from ldm.data.images import DataConfig, iter_prepared
from ldm.data.sources import DataReport

FORMAT = "ldm-latent-cache"
VERSION = 1


@dataclasses.dataclass
class EncodeConfig:
    vae: str = "runs/vae/vae"        # AutoencoderKL dir (stage 1 output) or an SD pipeline dir
    out_dir: str = "runs/latents"    # the cache directory
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    shard_size: int = 1024           # records per shard (the unit of atomic write and resume)
    batch_size: int = 32             # images per VAE forward
    dtype: str = "auto"              # auto (bf16 on CUDA, else fp32) | fp32 | bf16 | fp16
    overwrite: bool = False          # true: delete a cache made with other settings; false: refuse

    def validate(self) -> None:
        require(self.shard_size > 0, "shard_size must be > 0")
        require(self.batch_size > 0, "batch_size must be > 0")
        require(self.dtype in ("auto", "fp32", "bf16", "fp16"), f"dtype {self.dtype!r} is not auto|fp32|bf16|fp16")


class CacheMismatchError(ValueError):
    """The cache on disk was made by another VAE or other settings than this run expects."""


def expected_manifest(cfg: EncodeConfig, vae) -> dict:
    """The fields that must match between a cache and a run that reads it."""
    from ldm.models.vae import downsample_factor, latent_scale, weights_hash

    scale, shift = latent_scale(vae)
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
        "eval_size": cfg.data.eval_size,
        "max_images": cfg.data.max_images,
        "shard_size": cfg.shard_size,
    }


def describe_mismatch(found: dict, expected: dict) -> list[str]:
    diffs = []
    for key, want in expected.items():
        have = found.get(key, "<missing>")
        if isinstance(want, dict) and isinstance(have, dict):
            diffs += [f"{key}.{k}: cache has {have.get(k, '<missing>')!r}, run expects {v!r}"
                      for k, v in want.items() if have.get(k) != v]
        elif have != want:
            diffs.append(f"{key}: cache has {have!r}, run expects {want!r}")
    return diffs


def _shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.safetensors"


def _pending_file(out_dir: Path) -> Path:
    return out_dir / "encoding.json"


def encode_dataset(cfg: EncodeConfig, accelerator=None) -> Path:
    """Encode the train and eval splits into the cache; resumes; one or many processes."""
    from accelerate import Accelerator

    from ldm.models.vae import load_vae

    accelerator = accelerator or Accelerator()
    out_dir = Path(cfg.out_dir)
    vae = load_vae(cfg.vae).to(accelerator.device).eval().requires_grad_(False)
    dtype = _dtype(cfg.dtype, accelerator.device)
    if dtype != torch.float32:
        vae.to(dtype=dtype)
    if accelerator.device.type == "cuda":
        vae.to(memory_format=torch.channels_last)
    expected = expected_manifest(cfg, vae)

    if accelerator.is_main_process:
        _prepare_dir(out_dir, expected, cfg.overwrite)
    accelerator.wait_for_everyone()

    report = DataReport()
    counts = {}
    for split in ("train", "eval"):
        counts[split] = _encode_split(cfg, vae, dtype, split, out_dir, accelerator, report)
    # Each process's report of what it skipped is merged through a file, then the manifest.
    (out_dir / f"report-{accelerator.process_index}.json").write_text(json.dumps(report.to_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(out_dir, expected, accelerator.num_processes)
    accelerator.wait_for_everyone()
    return out_dir


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _prepare_dir(out_dir: Path, expected: dict, overwrite: bool) -> None:
    """Refuse (or with overwrite, clear) a directory holding another cache; note what we encode."""
    manifest = out_dir / "manifest.json"
    pending = _pending_file(out_dir)
    previous = json.loads(manifest.read_text()) if manifest.exists() else (
        json.loads(pending.read_text()) if pending.exists() else None)
    if previous is not None:
        diffs = describe_mismatch(previous, expected)
        if diffs and not overwrite:
            raise CacheMismatchError(
                f"{out_dir} holds a latent cache made with other settings:\n  " + "\n  ".join(diffs)
                + "\nUse another out_dir, or pass overwrite=true to delete it and re-encode.")
        if diffs:
            for f in out_dir.glob("*.safetensors"):
                f.unlink()
            manifest.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending.write_text(json.dumps(expected, indent=1))


def _encode_split(cfg: EncodeConfig, vae, dtype, split: str, out_dir: Path, accelerator, report: DataReport) -> int:
    rank, world = accelerator.process_index, accelerator.num_processes

    def mine_and_missing(index: int) -> bool:
        k = index // cfg.shard_size
        return k % world == rank and not (out_dir / _shard_name(split, k)).exists()

    buffer: list = []
    current = None
    written = 0
    desc = f"encode {split}" if accelerator.is_local_main_process else ""
    for index, image, captions, rid, meta in iter_prepared(cfg.data, split, report, mine_and_missing, desc):
        k = index // cfg.shard_size
        if current is not None and k != current:
            _write_shard(out_dir / _shard_name(split, current), buffer, vae, dtype, cfg)
            written += 1
            buffer = []
        current = k
        buffer.append((index, image, captions, rid, meta))
    if buffer:
        _write_shard(out_dir / _shard_name(split, current), buffer, vae, dtype, cfg)
        written += 1
    return written


@torch.no_grad()
def _posterior(vae, images: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(vae.parameters()).device
    x = images.to(device=device, dtype=dtype)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    dist = vae.encode(x).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def _write_shard(path: Path, items: list, vae, dtype, cfg: EncodeConfig) -> None:
    """Encode one shard's records (batched, grouped by size) and write it atomically."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for row, (_, image, *_rest) in enumerate(items):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(row)
    tensors = {}
    for (h, w), rows in by_size.items():
        means, stds, fmeans, fstds = [], [], [], []
        for s in range(0, len(rows), cfg.batch_size):
            batch = torch.stack([items[r][1] for r in rows[s : s + cfg.batch_size]])
            m, sd = _posterior(vae, batch, dtype)
            means.append(m), stds.append(sd)
            if cfg.data.transform.flip:
                m, sd = _posterior(vae, batch.flip(-1), dtype)
                fmeans.append(m), fstds.append(sd)
        f = vae.config.block_out_channels and 2 ** (len(vae.config.block_out_channels) - 1)
        key = f"{h // f}x{w // f}"
        tensors[f"mean/{key}"] = torch.cat(means).half()
        tensors[f"std/{key}"] = torch.cat(stds).half()
        tensors[f"index/{key}"] = torch.tensor(rows, dtype=torch.int64)
        if fmeans:
            tensors[f"flip_mean/{key}"] = torch.cat(fmeans).half()
            tensors[f"flip_std/{key}"] = torch.cat(fstds).half()
    records = [{"id": rid, "captions": caps, "meta": _jsonable(meta)} for (_, _, caps, rid, meta) in items]
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"records": json.dumps(records)})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # important: atomic; a killed encode never leaves half a shard


def _jsonable(meta: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}


def _finish(out_dir: Path, expected: dict, world: int) -> None:
    report = DataReport()
    for f in sorted(out_dir.glob("report-*.json")):
        report.merge(DataReport.from_dict(json.loads(f.read_text())))
        f.unlink()
    splits = {}
    for split in ("train", "eval"):
        shards = sorted(out_dir.glob(f"{split}-*.safetensors"))
        count = sum(len(_records(p)) for p in shards)
        splits[split] = {"shards": [p.name for p in shards], "count": count}
    manifest = {**expected, "splits": splits, "report": report.to_dict(), "processes": world}
    tmp = out_dir / ".tmp-manifest.json"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / "manifest.json")
    _pending_file(out_dir).unlink(missing_ok=True)
    print(f"latent cache: {splits['train']['count']} train + {splits['eval']['count']} eval images in {out_dir}")
    print(report.summary())


def _records(path: Path) -> list[dict]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["records"])


# ----------------------------------------------------------------------------- reading


class LatentCache:
    """One split of a cache in memory: posterior parameters grouped by latent size + captions."""

    def __init__(self, manifest: dict, groups: dict, captions: list[list[str]], ids: list[str]):
        self.manifest, self.groups, self.captions, self.ids = manifest, groups, captions, ids
        # item i -> (size key, row in that group)
        self.locate = {}
        for key, g in groups.items():
            for row, item in enumerate(g["items"].tolist()):
                self.locate[item] = (key, row)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def scaling(self) -> tuple[float, float]:
        return self.manifest["scaling_factor"], self.manifest["shift_factor"]

    def size_groups(self) -> dict[str, list[int]]:
        return {key: g["items"].tolist() for key, g in self.groups.items()}

    def latents(self, indices: list[int], generator: torch.Generator | None = None, mode: bool = False,
                flip: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents for items of one size: a fresh posterior sample (or the mean)."""
        keys = {self.locate[i][0] for i in indices}
        if len(keys) != 1:
            raise ValueError(f"a batch must come from one latent size, got {sorted(keys)}")
        g = self.groups[keys.pop()]
        rows = torch.tensor([self.locate[i][1] for i in indices])
        mean, std = g["mean"][rows].float(), g["std"][rows].float()
        if flip is not None and "flip_mean" in g:
            mean = torch.where(flip[:, None, None, None], g["flip_mean"][rows].float(), mean)
            std = torch.where(flip[:, None, None, None], g["flip_std"][rows].float(), std)
        z = mean if mode else mean + std * torch.randn(mean.shape, generator=generator)
        scale, shift = self.scaling
        return (z - shift) * scale


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.exists():
        hint = " (an encode was interrupted: run the encode command again to finish it)" if _pending_file(Path(cache_dir)).exists() else ""
        raise FileNotFoundError(f"no latent cache at {cache_dir}: manifest.json is missing{hint}")
    return json.loads(path.read_text())


def open_cache(cache_dir: str | Path, split: str = "train", expect: dict | None = None) -> LatentCache:
    """Load a split; with `expect` (e.g. {"vae_hash": ...}), refuse a cache that differs."""
    manifest = read_manifest(cache_dir)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheMismatchError(f"{cache_dir}: not a {FORMAT} v{VERSION} cache; re-encode it")
    if expect:
        diffs = describe_mismatch(manifest, expect)
        if diffs:
            raise CacheMismatchError(
                f"the latent cache {cache_dir} does not match this run:\n  " + "\n  ".join(diffs)
                + "\nRe-encode it for this VAE and these settings (python encode.py --config ...), "
                "or point the run at the matching cache.")
    parts: dict[str, dict[str, list]] = {}
    captions, ids = [], []
    for name in manifest["splits"][split]["shards"]:
        offset = len(captions)
        with safe_open(str(Path(cache_dir) / name), "pt") as f:
            records = json.loads(f.metadata()["records"])
            for key in f.keys():
                field, size = key.split("/")
                tensor = f.get_tensor(key)
                if field == "index":
                    tensor = tensor + offset
                parts.setdefault(size, {}).setdefault(field, []).append(tensor)
        captions += [r["captions"] for r in records]
        ids += [r["id"] for r in records]
    groups = {size: {("items" if k == "index" else k): torch.cat(v) for k, v in fields.items()} for size, fields in parts.items()}
    return LatentCache(manifest, groups, captions, ids)
