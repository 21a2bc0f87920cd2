"""Stage 2: the latent cache, the contract between the VAE (stage 1) and the U-Net (stage 3).

Layout of a cache directory:

    manifest.json             what made it (below); written last, so its presence means complete
    encoding.json             the settings of an encode in progress (removed when it completes)
    train-00000.safetensors   shard k: records [k * shard_size, (k + 1) * shard_size) of the split
    eval-00000.safetensors    held-out records (chosen by key hash, ldm.data.split), same format
    text.safetensors          optional (ldm.train.encode.EncodeConfig.text): the text encoder's output per caption
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

This module is the format's one owner: its writers (`prepare_dir`, `write_shard`,
`write_text_embeddings`, `write_manifest`, all atomic: ldm.atomic) and its one reader
(`read_manifest`, `open_cache`), which refuses another version, a missing file or key, and, with
`expect=...`, a cache that does not match the run, naming each key with both values. Stage 3
checks the VAE it decodes with (`vae_identity`: weights hash, scaling_factor, shift_factor), so the
one latent scale that scales its training latents is the one that decodes its samples. The
encoding loop, stage 2, is `ldm.train.encode`: an encode refuses to add to a directory made with
other settings unless overwrite=true, refuses to hold out other images than the VAE's run did
(ldm.data.split), and an interrupted one resumes by skipping the shards that exist.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import mmap
import os
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save

from ldm.atomic import TMP_GLOB, write_atomic
from ldm.data.images import DataConfig, plan_split
from ldm.data.sources import SourceConfig
from ldm.data.split import HeldOut
from ldm.models.vae import downsample_factor, latent_scale, weights_hash
from ldm.safetensors_io import open_safetensors, unreadable_safetensors

FORMAT = "ldm-latent-cache"
VERSION = 3  # 2: source fingerprint, encode precision, optional text.safetensors; 3: held out by key hash, `split`
MANIFEST, PENDING, TEXT_FILE, LOG_FILE = "manifest.json", "encoding.json", "text.safetensors", "encode.jsonl"
SPLITS = ("train", "eval")
REQUIRED = ("format", "version", "vae_hash", "scaling_factor", "shift_factor", "latent_channels", "transform", "splits")


class CacheMismatchError(ValueError):
    """The cache on disk was made by another VAE or other settings than this run expects."""


def vae_identity(vae) -> dict:
    """What a cache records of the VAE that encoded it, and what stage 3 checks against the VAE it
    decodes with (`open_cache(expect=...)`): the weights' hash, and the latent scale and shift, the
    one scale that both scales training latents (`LatentCache.latents`) and decodes samples
    (`ldm.sampling.decode_latents`). The hash alone would pass a VAE re-exported with another scale."""
    scale, shift = latent_scale(vae)
    return {"vae_hash": weights_hash(vae), "scaling_factor": scale, "shift_factor": shift}


def expected_manifest(data: DataConfig, shard_size: int, vae, dtype: str = "fp32", heldout: HeldOut | None = None) -> dict:
    """The fields that must match between a cache and the encode that adds to it.

    `split` is the held-out set's record (ldm.data.split); for a stream, whose held-out keys are
    known only after a pass, just its rule and settings (the manifest gets the full record).
    """
    split = (heldout if heldout is not None else plan_split(data)).record()
    return {
        "format": FORMAT,
        "version": VERSION,
        **vae_identity(vae),
        "downsample_factor": downsample_factor(vae),
        "latent_channels": int(vae.config.latent_channels),
        "transform": dataclasses.asdict(data.transform),
        "source": dataclasses.asdict(data.source),
        "source_fingerprint": source_fingerprint(data.source),
        "split": {k: v for k, v in split.items() if v is not None},
        "max_images": data.max_images,
        "shard_size": shard_size,
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
    return {"encoder_hash": weights_hash(text_encoder), "clip_skip": clip_skip,
            "pad_token": tokenizer.pad_token, "max_length": tokenizer.model_max_length}


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.safetensors"


# ----------------------------------------------------------------------------- writing (ldm.train.encode calls these)


def prepare_dir(out_dir: Path, expected: dict, overwrite: bool) -> None:
    """Refuse (or with overwrite, clear) a directory holding a cache made otherwise; note what we encode."""
    previous = next((_read_json(p) for p in (out_dir / MANIFEST, out_dir / PENDING) if p.exists()), None)
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
    for f in out_dir.glob(TMP_GLOB):  # left by a killed encode; no other process writes yet
        f.unlink()
    write_atomic(out_dir / PENDING, json.dumps(expected, indent=1))


def write_shard(path: Path, tensors: dict[str, torch.Tensor], records: list[dict]) -> None:
    """One shard (module docstring), atomically: a killed encode never leaves half a file."""
    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata={"records": json.dumps(records)}))


def write_text_embeddings(path: Path, embeddings: torch.Tensor, captions: list[str], identity: dict) -> None:
    """text.safetensors (module docstring), atomically; `identity` is the encoder's (`text_identity`)."""
    metadata = {"captions": json.dumps(captions), "identity": json.dumps(identity)}
    write_atomic(path, save({"embeddings": embeddings.contiguous()}, metadata=metadata))


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """The manifest, written last: its presence means the cache is complete."""
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    (out_dir / PENDING).unlink(missing_ok=True)


def check_shards(out_dir: Path, counts: dict[str, int], shard_size: int) -> dict:
    """Each split's shards, checked against the record counts the source gives now.

    A shard left by an encode of a source that has changed since (records added or removed
    where the fingerprint cannot see it, as in a hub dataset) holds another number of records
    than its place in the split calls for, or there is one shard too many or too few: refuse
    rather than mix old and new records.
    """
    splits = {}
    for split, count in counts.items():
        names = [shard_name(split, k) for k in range(math.ceil(count / shard_size))]
        found = sorted(p.name for p in out_dir.glob(f"{split}-*.safetensors"))
        if found != names:
            raise CacheMismatchError(
                f"{out_dir}: the {split} split now has {count} records, so {len(names)} shards are expected, "
                f"found {len(found)} ({', '.join(sorted(set(found) ^ set(names))[:4])} differ): the source "
                "changed since they were written; re-encode with overwrite=true")
        for k, name in enumerate(names):
            held, want = len(shard_records(out_dir / name)), min(shard_size, count - k * shard_size)
            if held != want:
                raise CacheMismatchError(
                    f"{out_dir / name} holds {held} records where the source now gives {want}: the source "
                    "changed since it was written; re-encode with overwrite=true")
        splits[split] = {"shards": names, "count": count}
    return splits


def text_file_header(path: Path) -> tuple[list[str], dict] | None:
    """(captions, encoder identity) of an existing text.safetensors, or None."""
    if not path.exists():
        return None
    with open_safetensors(path) as f:
        meta = f.metadata()
    return json.loads(meta["captions"]), json.loads(meta["identity"])


def shard_records(path: Path) -> list[dict]:
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheMismatchError(f"{path}: not JSON ({err}); re-encode (overwrite=true)") from None


def read_manifest(cache_dir: str | Path) -> dict:
    """The manifest of the cache at `cache_dir`, checked: a missing manifest, another format or
    version, or a missing key is an error that names the file (and the key).

    A cache of another version (1, 2) is refused: re-encode it. VERSION has been 3 since the
    held-out split is chosen by key hash; a change to what the manifest or shards hold bumps it.
    """
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        hint = (" (an encode was interrupted: run the encode command again to finish it)"
                if (Path(cache_dir) / PENDING).exists() else "")
        raise FileNotFoundError(f"no latent cache at {cache_dir}: {path} is missing{hint}")
    manifest = _read_json(path)
    reencode = "re-encode it (python encode.py --config ... overwrite=true)"
    for key, want in (("format", FORMAT), ("version", VERSION)):
        if manifest.get(key) != want:
            raise CacheMismatchError(f"{path}: key {key!r} is {manifest.get(key, '<missing>')!r}; this ldm reads "
                                     f"{FORMAT} version {VERSION} caches: {reencode}")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise CacheMismatchError(f"{path}: key {missing[0]!r} is missing; {reencode}")
    return manifest


def open_cache(cache_dir: str | Path, split: str = "train", expect: dict | None = None) -> LatentCache:
    """Open a split (memory-mapped); with `expect` (e.g. `vae_identity(vae)`), refuse a cache that
    differs, naming each key with both values."""
    manifest = read_manifest(cache_dir)
    if expect:
        diffs = describe_mismatch(manifest, expect)
        if diffs:
            raise CacheMismatchError(
                f"the latent cache {cache_dir} does not match this run ({Path(cache_dir) / MANIFEST}):\n  "
                + "\n  ".join(diffs)
                + "\nRe-encode it for this VAE and these settings (python encode.py --config ... overwrite=true), "
                "or point the run at the matching cache.")
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in the cache at {cache_dir}; it has {sorted(manifest['splits'])}")
    for name in manifest["splits"][split]["shards"]:
        if not (Path(cache_dir) / name).is_file():
            raise FileNotFoundError(f"{Path(cache_dir) / name} is missing: {Path(cache_dir) / MANIFEST} lists it "
                                    f"(key 'splits.{split}.shards'); re-encode (overwrite=true)")
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
