"""The CLIP stage (ldm.train.clip, train_clip.py): a 20-step run, its exports, its config checks."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel

from ldm.config import ConfigError, load_config
from ldm.data.shapes import ShapesDataset
from ldm.models.text import build_tokenizer, load_text_encoder
from ldm.train.clip import ClipModel, ClipTrainConfig, load_clip_scorer, openclip_model_cfg, retrieval, tokenize, train_clip

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.source.size=64", "data.source.resolution=16", "data.transform.resolution=16",
    "data.source.captions_per_image=5", "data.eval_size=8", "retrieval_candidates=8",
    "model.embed_dim=32", "model.image_width=32", "model.image_layers=1", "model.image_head_width=16",
    "model.patch_size=8", "model.text_width=32", "model.text_layers=2", "model.text_heads=2",
    "train.steps=20", "train.batch_size=32", "train.lr=0.002", "train.log_every=1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 20-step run shared by the tests below: (config, out_dir)."""
    out = tmp_path_factory.mktemp("clip")
    cfg = load_config(ClipTrainConfig, None, [f"out_dir={out}", *TINY])
    train_clip(cfg)
    return cfg, out


def _trained_openclip(cfg: ClipTrainConfig, out) -> open_clip.CLIP:
    """The trained open_clip model, from the final resumable checkpoint (not from the export)."""
    model = open_clip.CLIP(**openclip_model_cfg(cfg.model, cfg.data.transform.resolution)).eval()
    model.load_state_dict(load_file(out / "checkpoints" / f"step-{cfg.train.steps}" / "model.safetensors"))
    return model


def test_loss_falls(run):
    _, out = run
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def test_exported_text_encoder_equals_the_trained_tower(run):
    cfg, out = run
    model = _trained_openclip(cfg, out)
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", local_files_only=True)
    _, tokenizer = load_text_encoder(out)
    ids = tokenize(tokenizer, ["a small red circle on the left, on a white background", "gray background with a star"])
    with torch.no_grad():
        states = model.ln_final(model.transformer(model.token_embedding(ids) + model.positional_embedding,
                                                  attn_mask=model.attn_mask))
        out_hf = text_encoder(ids)
        torch.testing.assert_close(out_hf.last_hidden_state, states, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_hf.pooler_output @ model.text_projection, model.encode_text(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pad_token", ["!", "<|endoftext|>"])
def test_text_tower_runs_only_up_to_the_last_caption_end(pad_token):
    """ClipModel cuts the batch after its last <|endoftext|>: the features and the gradients are
    open_clip's own over all 77 positions, from fewer positions."""
    cfg = load_config(ClipTrainConfig, None, TINY)
    torch.manual_seed(0)
    ours = ClipModel(**openclip_model_cfg(cfg.model, 16))
    theirs = open_clip.CLIP(**openclip_model_cfg(cfg.model, 16))
    theirs.load_state_dict(ours.state_dict())
    ids = tokenize(build_tokenizer(pad_token=pad_token), ["a small red circle on the left, on a white background", "a star"])
    assert ids.shape[1] == 77
    seen = []
    ours.transformer.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    features = [model.encode_text(ids, normalize=True) for model in (ours, theirs)]
    torch.testing.assert_close(features[0], features[1], atol=1e-6, rtol=0)
    assert seen == [int((ids[0] == ids.max()).nonzero()[0]) + 1] and seen[0] < 20
    for f, model in zip(features, (ours, theirs)):
        f[:, 0].sum().backward()
    torch.testing.assert_close(ours.token_embedding.weight.grad, theirs.token_embedding.weight.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.positional_embedding.grad[: seen[0]], theirs.positional_embedding.grad[: seen[0]],
                               atol=1e-5, rtol=0)
    assert not theirs.positional_embedding.grad[seen[0]:].any()  # what was cut had no say in open_clip's run either


def test_scorer_gives_the_trained_model_features(run):
    cfg, out = run
    model = _trained_openclip(cfg, out)
    scorer = load_clip_scorer(out)
    items = [ShapesDataset(4, resolution=16, seed=5)[i] for i in range(4)]
    images = torch.stack([torch.from_numpy(np.asarray(it["image"]).copy()).permute(2, 0, 1) for it in items])
    captions = [it["caption"] for it in items]
    with torch.no_grad():
        expected_img = model.encode_image(images.float() / 127.5 - 1)
        expected_txt = model.encode_text(tokenize(scorer.tokenizer, captions))
    torch.testing.assert_close(scorer.image_features([it["image"] for it in items]), expected_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.image_features(images), expected_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.text_features(captions), expected_txt, atol=1e-5, rtol=0)
    big = torch.nn.functional.interpolate(images.float() / 127.5 - 1, scale_factor=2)
    assert scorer.image_features(big).shape == (4, cfg.model.embed_dim)


def test_eval_and_run_directory(run):
    cfg, out = run
    results = json.loads((out / "eval.json").read_text())
    assert results["candidates"] == 8 and 0 <= results["i2t_top1"] <= 1
    assert results["split"] == {"rule": "shapes-seed", "eval_size": 8, "seed": 1_000_003, "count": 8,
                                "keys_sha256": results["split"]["keys_sha256"]}
    for name in ("config.yaml", "tokenizer/tokenizer_config.json", "image_encoder/config.json",
                 "text_encoder/config.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "image_encoder" / "config.json").read_text())
    assert meta["train_config"]["train"]["steps"] == 20 and meta["image_size"] == 16


def test_rerunning_the_command_resumes_exactly(run, tmp_path):
    """20 steps, then the same command with train.steps=25, equals 25 steps in one go."""
    cfg, out = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    train_clip(load_config(ClipTrainConfig, None, [f"out_dir={resumed}", *TINY, "train.steps=25"]))
    straight = tmp_path / "straight"
    train_clip(load_config(ClipTrainConfig, None, [f"out_dir={straight}", *TINY, "train.steps=25"]))

    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert [s for s, _ in losses(resumed)] == list(range(1, 26))  # steps 1-20 were not redone
    assert [loss for _, loss in losses(resumed)] == pytest.approx([loss for _, loss in losses(straight)])
    a, b = (load_file(d / "text_encoder" / "model.safetensors") for d in (resumed, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retrieval_counts_identical_captions_as_correct():
    images = torch.eye(3)
    texts = torch.stack([images[0] + images[2], images[1], 0.5 * images[2]])  # image 2 prefers caption 0
    assert retrieval(images, texts, ["a", "b", "a"])["i2t_top1"] == 1.0  # caption 0 says what caption 2 says
    distinct = retrieval(images, texts, ["a", "b", "c"])
    assert distinct["i2t_top1"] == pytest.approx(2 / 3) and distinct["chance_top1"] == pytest.approx(1 / 3)
    assert distinct["t2i_top1"] == 1.0  # each caption's best image is its own


@pytest.mark.parametrize("override,message", [
    ("model.patch_size=5", "patch_size"),
    ("data.eval_size=10", "retrieval_candidates"),
    ("train.grad_accum=2", "grad_accum"),
    ("model.texts_width=3", "texts_width"),
])
def test_bad_configs_fail_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ClipTrainConfig, None, [override])


@pytest.mark.parametrize("name", ["shapes_cpu.yaml", "shapes_gpu.yaml"])
def test_cli_dry_run_validates_the_shipped_configs(capsys, name):
    spec = importlib.util.spec_from_file_location("train_clip", ROOT / "train_clip.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    config = str(ROOT / "configs" / "clip" / name)
    cli.main(["--config", config, "--dry-run", "train.steps=7"])
    assert "steps: 7" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--config", config, "--dry-run", "train.nope=1"])
    assert "train.nope" in capsys.readouterr().err
