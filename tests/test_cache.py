"""The latent cache (stage 2): resume after a kill, refusal of a mismatched cache, several
processes equal to one, fresh posterior samples for stage 3, buckets, flips, text embeddings."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open

from ldm.config import load_config
from ldm.data.cache import CacheMismatchError, open_cache, read_manifest, text_identity, vae_identity
from ldm.data.transforms import prepare_image
from ldm.models.conditioning import TextEncoderConfig, load_text
from ldm.models.presets import vae_config
from ldm.models.text import encode_prompts
from ldm.models.vae import load_vae, set_latent_scale, weights_hash
from ldm.train.encode import EncodeConfig, encode_dataset

REPO = Path(__file__).resolve().parent.parent
# 4 train shards of 48 and one eval shard at 32 px: a shard takes ~0.1 s on one core, time
# enough to kill the encode between two shards.
SHAPES = ["data.source.kind=shapes", "data.source.size=192", "data.source.resolution=32",
          "data.transform.resolution=32", "data.eval_size=16", "shard_size=48", "batch_size=8"]
N_TRAIN_SHARDS = 4


def save_vae(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    AutoencoderKL(**vae_config("tiny-f4", scaling_factor=0.7, shift_factor=0.1)).save_pretrained(path)
    return path


def encode_cfg(vae: Path, out: Path, *overrides: str) -> EncodeConfig:
    return load_config(EncodeConfig, None, [f"vae={vae}", f"out_dir={out}", *overrides])


def contents(cache_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Every tensor ("shard:key") and every shard's records, read straight from the files."""
    tensors, records = {}, {}
    for path in sorted(cache_dir.glob("*-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors |= {f"{path.name}:{k}": f.get_tensor(k) for k in f.keys()}
            records[path.name] = json.loads(f.metadata()["records"])
    return tensors, records


def assert_same_cache(a: Path, b: Path) -> None:
    (ta, ra), (tb, rb) = contents(a), contents(b)
    assert ra == rb  # same shards, same records in the same order
    assert ta.keys() == tb.keys()
    for key in ta:
        # within one float16 step: with several threads, the VAE's float32 sums may differ in the
        # last bit between runs and round to the neighbouring float16
        assert torch.allclose(ta[key].double(), tb[key].double(), atol=1e-6, rtol=2**-10), key


def write_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """Noise PNGs of the given (w, h) sizes with sidecar captions (two images share one)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a photo number {min(i, len(sizes) - 2)}")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_vae(tmp_path_factory.mktemp("vae"), seed=0)


@pytest.fixture(scope="module")
def reference(vae_dir, tmp_path_factory) -> Path:
    """An uninterrupted one-process encode of the shapes settings."""
    return encode_dataset(encode_cfg(vae_dir, tmp_path_factory.mktemp("ref") / "latents", *SHAPES))


# ----------------------------------------------------------------------------- resume, processes


def test_resume_after_kill_equals_uninterrupted_encode(vae_dir, reference, tmp_path):
    out = tmp_path / "latents"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "encode.py"), f"vae={vae_dir}", f"out_dir={out}", *SHAPES],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "train-00000.safetensors"
    deadline = time.time() + 60
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert len(list(out.glob("train-*.safetensors"))) < N_TRAIN_SHARDS and not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        read_manifest(out)
    first_inode = first.stat().st_ino
    (out / ".tmp-999-train-00001.safetensors").write_bytes(b"half a shard")  # as a kill mid-write leaves

    encode_dataset(encode_cfg(vae_dir, out, *SHAPES))

    assert first.stat().st_ino == first_inode  # the finished shard was skipped, not rewritten
    assert not list(out.glob(".tmp-*")) and not (out / "encoding.json").exists()
    assert_same_cache(out, reference)
    assert read_manifest(out)["splits"] == read_manifest(reference)["splits"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_encode_equals_one_process(vae_dir, reference, tmp_path):
    out = tmp_path / "latents"
    # `--cpu --num_processes 2` starts ONE process unless launched through mpirun (accelerate 1.15);
    # torchrun's launcher with ACCELERATE_USE_CPU gives two gloo processes on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([*launch, str(REPO / "encode.py"), f"vae={vae_dir}", f"out_dir={out}", *SHAPES],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_cache(out, reference)
    manifest = read_manifest(out)
    assert manifest["processes"] == 2
    assert manifest["splits"] == read_manifest(reference)["splits"]
    assert manifest["report"] == read_manifest(reference)["report"]  # not counted once per process
    writers = {json.loads(line)["process"] for line in (out / "encode.jsonl").read_text().splitlines()}
    assert writers == {0, 1}  # each process encoded its own shards


# ----------------------------------------------------------------------------- refusal


def test_reader_refuses_another_vae_or_resolution(reference, tmp_path):
    other = load_vae(save_vae(tmp_path / "other", seed=1))
    with pytest.raises(CacheMismatchError, match=r"(?s)vae_hash: cache has .* run expects .*Re-encode"):
        open_cache(reference, expect={"vae_hash": weights_hash(other)})
    with pytest.raises(CacheMismatchError, match="transform.resolution: cache has 32, run expects 64"):
        open_cache(reference, expect={"transform": {"resolution": 64}})
    assert len(open_cache(reference, expect={"vae_hash": read_manifest(reference)["vae_hash"]})) == 192


def test_stage3_refuses_the_same_weights_with_another_latent_scale_or_shift(vae_dir, reference):
    """The weights' hash alone would pass a VAE re-exported with another shift: the training latents
    would be scaled with the cache's copy and the samples decoded with the VAE's."""
    vae = load_vae(vae_dir)
    assert len(open_cache(reference, expect=vae_identity(vae))) == 192
    set_latent_scale(vae, 0.7, 0.25)
    with pytest.raises(CacheMismatchError, match=r"(?s)manifest\.json.*shift_factor: cache has 0\.1, run expects 0\.25"):
        open_cache(reference, expect=vae_identity(vae))
    set_latent_scale(vae, 0.5, 0.1)
    with pytest.raises(CacheMismatchError, match=r"scaling_factor: cache has 0\.7, run expects 0\.5"):
        open_cache(reference, "eval", expect=vae_identity(vae))


def test_reader_names_the_file_and_key_it_cannot_read(reference, tmp_path):
    cache = tmp_path / "latents"
    shutil.copytree(reference, cache)
    manifest = read_manifest(cache)
    for change, key in (({"version": 4}, "'version' is 4"), ({"format": "other"}, "'format' is 'other'")):
        (cache / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(CacheMismatchError, match=rf"{cache / 'manifest.json'}: key {key}; .*re-encode"):
            open_cache(cache)
    (cache / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "shift_factor"}))
    with pytest.raises(CacheMismatchError, match=rf"{cache / 'manifest.json'}: key 'shift_factor' is missing"):
        open_cache(cache)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    (cache / "train-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{cache / 'train-00002.safetensors'} is missing: .*'splits.train.shards'"):
        open_cache(cache)
    assert len(open_cache(cache, "eval")) == 16  # the other split is whole
    (cache / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no latent cache at {cache}: {cache / 'manifest.json'} is missing"):
        open_cache(cache)


def test_encode_refuses_to_mix_settings_unless_overwrite(vae_dir, reference, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(reference, out)
    before = (out / "manifest.json").read_text()
    other_vae = save_vae(tmp_path / "other", seed=1)
    with pytest.raises(CacheMismatchError, match=r"(?s)vae_hash: cache has .*overwrite=true"):
        encode_dataset(encode_cfg(other_vae, out, *SHAPES))
    with pytest.raises(CacheMismatchError, match=r"(?s)transform.resolution: cache has 32, run expects 16.*overwrite=true"):
        encode_dataset(encode_cfg(vae_dir, out, *SHAPES, "data.transform.resolution=16"))
    assert (out / "manifest.json").read_text() == before  # refused before touching anything

    encode_dataset(encode_cfg(vae_dir, out, *SHAPES, "data.transform.resolution=16", "overwrite=true"))
    cache = open_cache(out)
    assert cache.manifest["transform"]["resolution"] == 16 and list(cache.size_groups()) == ["4x4"]


def test_a_bf16_encode_is_accepted_for_the_fp32_vae_it_came_from(vae_dir, tmp_path):
    out = encode_dataset(encode_cfg(vae_dir, tmp_path / "latents", *SHAPES, "data.source.size=8", "dtype=bf16"))
    cache = open_cache(out, expect={"vae_hash": weights_hash(load_vae(vae_dir))})  # what stage 3 checks
    assert cache.manifest["encode_dtype"] == "bf16" and len(cache) == 8


def test_encode_refuses_a_changed_source_folder(vae_dir, tmp_path):
    root = write_folder(tmp_path / "images", [(32, 32)] * 3)
    settings = ["data.source.kind=imagefolder", f"data.source.path={root}", "data.transform.resolution=32",
                "data.eval_size=0"]
    out = encode_dataset(encode_cfg(vae_dir, tmp_path / "latents", *settings))
    Image.new("RGB", (32, 32)).save(root / "added.png")
    with pytest.raises(CacheMismatchError, match="source_fingerprint"):
        encode_dataset(encode_cfg(vae_dir, out, *settings))


# ----------------------------------------------------------------------------- reading for stage 3


def test_latents_are_fresh_posterior_samples_around_the_stored_mean(reference):
    cache = open_cache(reference)
    scale, shift = cache.scaling
    assert (scale, shift) == (0.7, 0.1)
    with safe_open(str(reference / "train-00000.safetensors"), "pt") as f:  # read apart from LatentCache
        mean, std, rows = (f.get_tensor(f"{k}/8x8") for k in ("mean", "std", "index"))
    items = rows[:4].tolist()
    want_mean, want_std = (mean[:4].float() - shift) * scale, std[:4].float() * scale

    assert torch.equal(cache.latents(items, mode=True), want_mean)
    draws = torch.stack([cache.latents(items, generator=torch.Generator().manual_seed(s)) for s in range(1000)])
    assert not torch.allclose(draws[0], draws[1])  # a new sample each time
    assert torch.equal(draws[7], cache.latents(items, generator=torch.Generator().manual_seed(7)))
    tolerance = 5 * want_std / 1000**0.5  # 5 standard errors of the mean of 1000 draws
    assert ((draws.mean(0) - want_mean).abs() < tolerance).all()
    assert torch.allclose(draws.std(0), want_std, rtol=0.15)


def test_a_batch_reads_its_rows_from_the_shards_on_disk(reference, tmp_path):
    out = Path(shutil.copytree(reference, tmp_path / "latents"))
    cache = open_cache(out)
    scale, shift = cache.scaling
    tensors, records = contents(out)
    where = {}  # item -> (shard, row of its latent in that shard)
    for k, name in enumerate(n for n in records if n.startswith("train-")):
        for row, r in enumerate(tensors[f"{name}:index/8x8"].tolist()):
            where[k * 48 + r] = (name, row)
    items = [150, 3, 60, 101, 4, 175]  # four shards, out of order
    want = torch.stack([tensors[f"{where[i][0]}:mean/8x8"][where[i][1]] for i in items]).float()
    assert torch.equal(cache.latents(items, mode=True), (want - shift) * scale)

    # Zero shard 2's means in place after opening: the next batch sees the zeros, so the cache
    # was mapped, not loaded (a cache larger than RAM trains).
    shard = out / "train-00002.safetensors"
    with open(shard, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        start, end = json.loads(fh.read(size))["mean/8x8"]["data_offsets"]
        fh.seek(8 + size + start)
        fh.write(bytes(end - start))
    zeroed = cache.latents([101, 3], mode=True)
    assert torch.equal(zeroed[0], torch.full_like(zeroed[0], -shift * scale))
    assert torch.equal(zeroed[1], cache.latents([3], mode=True)[0]) and zeroed[1].abs().sum() > 0


def test_buckets_share_a_shard_and_flip_stores_the_mirrored_encoding(vae_dir, tmp_path):
    # 3:2, 1:1 and 2:3 images -> buckets 40x24, 32x32, 24x40 px -> latents 6x10, 8x8, 10x6
    sizes = [(48, 32), (32, 32), (32, 48), (48, 32), (32, 32), (32, 48), (48, 32)]
    root = write_folder(tmp_path / "images", sizes)
    cfg = encode_cfg(vae_dir, tmp_path / "latents", "data.source.kind=imagefolder", f"data.source.path={root}",
                     "data.eval_size=0", "data.transform.resolution=32", "data.transform.buckets=true",
                     "data.transform.bucket_step=8", "data.transform.flip=true", "shard_size=64", "batch_size=2")
    out = encode_dataset(cfg)

    tensors, records = contents(out)
    assert list(records) == ["train-00000.safetensors"]
    assert {k.split("/")[1] for k in tensors} == {"6x10", "8x8", "10x6"}  # several sizes in one shard
    cache = open_cache(out)
    groups = cache.size_groups()
    assert sorted(map(sorted, groups.values())) == [[0, 3, 6], [1, 4], [2, 5]]
    for key, items in groups.items():
        for i in items:  # the group is the record's bucket, as its meta says
            th, tw = records["train-00000.safetensors"][i]["meta"]["target_size"]
            assert key == f"{th // 4}x{tw // 4}"
        assert cache.latents(items).shape == (len(items), 4, *map(int, key.split("x")))
    with pytest.raises(ValueError, match="one latent size"):
        cache.latents([0, 1])

    vae = load_vae(vae_dir)
    scale, shift = cache.scaling
    for i in groups["6x10"]:
        image = Image.open(root / cache.ids[i]).convert("RGB")
        x, _ = prepare_image(image, cfg.data.transform, random.Random(0))  # center crop: no randomness
        with torch.no_grad():
            mirrored = vae.encode(x.flip(-1)[None]).latent_dist.mean
            plain = vae.encode(x[None]).latent_dist.mean
        flipped = cache.latents([i], mode=True, flip=torch.tensor([True])) / scale + shift
        assert torch.allclose(flipped, mirrored, atol=2e-3)
        assert torch.allclose(cache.latents([i], mode=True) / scale + shift, plain, atol=2e-3)
        assert not torch.allclose(flipped, plain.flip(-1), atol=2e-2)  # the mirrored image, not a mirrored latent


def test_random_crops_do_not_depend_on_which_shards_are_encoded(vae_dir, tmp_path):
    root = write_folder(tmp_path / "images", [(48, 32), (32, 48)] * 4)
    cfg = encode_cfg(vae_dir, tmp_path / "latents", "data.source.kind=imagefolder", f"data.source.path={root}",
                     "data.eval_size=0", "data.transform.resolution=32", "data.transform.crop=random", "shard_size=4")
    out = encode_dataset(cfg)
    before = contents(out)
    crops = {tuple(r["meta"]["crop_top_left"]) for shard in before[1].values() for r in shard}
    assert len(crops) > 2  # the crops are random
    (out / "train-00001.safetensors").unlink()
    encode_dataset(cfg)  # re-encodes only the missing shard, with the same crops
    after = contents(out)
    assert after[1] == before[1]
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])


# ----------------------------------------------------------------------------- text embeddings


def test_text_embedding_cache_round_trip(vae_dir, tmp_path):
    root = write_folder(tmp_path / "images", [(32, 32)] * 4)  # captions: 0, 1, 2, 2
    settings = ["data.source.kind=imagefolder", f"data.source.path={root}", "data.eval_size=1",
                "data.transform.resolution=32", "text.encoder=tiny"]
    out = encode_dataset(encode_cfg(vae_dir, tmp_path / "latents", *settings))

    text_encoder, tokenizer = load_text(TextEncoderConfig(encoder="tiny"))
    cache = open_cache(out)
    entry = cache.manifest["text"]
    assert entry["encoder_hash"] == weights_hash(text_encoder) and entry["clip_skip"] == 0
    assert entry["count"] == 4  # three unique captions (train and eval) and ""
    assert cache.text_matches(text_identity(text_encoder, tokenizer, clip_skip=0))
    assert not cache.text_matches(text_identity(text_encoder, tokenizer, clip_skip=1))

    prompts = [cache.captions[1][0], "", cache.captions[0][0], "a photo number 2"]
    got = cache.text_embeddings(prompts)
    with torch.no_grad():
        want = encode_prompts(text_encoder, tokenizer, prompts)
    assert got.shape == (4, 77, 64) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=5e-3)
    assert cache.text_embeddings(["a caption never seen"]) is None  # the caller encodes it instead

    # A re-run keeps the text file; another clip_skip rewrites it without re-encoding a shard.
    inodes = {p.name: p.stat().st_ino for p in out.glob("*.safetensors")}
    encode_dataset(encode_cfg(vae_dir, out, *settings))
    assert {p.name: p.stat().st_ino for p in out.glob("*.safetensors")} == inodes
    encode_dataset(encode_cfg(vae_dir, out, *settings, "text.clip_skip=1"))
    changed = {p.name for p in out.glob("*.safetensors") if p.stat().st_ino != inodes[p.name]}
    assert changed == {"text.safetensors"}
    assert open_cache(out).text_matches(text_identity(text_encoder, tokenizer, clip_skip=1))
