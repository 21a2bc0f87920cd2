"""Configs: every shipped YAML resolves; bad keys, types, values and combinations fail early, by name."""

from pathlib import Path

import pytest
import yaml

from ldm.config import ConfigError, load_config
from ldm.train.encode import EncodeConfig
from ldm.models.text import TEXT_PRESETS
from ldm.train.ldm import LDMTrainConfig
from ldm.train.vae import VAETrainConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "vae").glob("*.yaml")), ids=lambda p: p.name)
def test_vae_configs_resolve(path):
    cfg = load_config(VAETrainConfig, path)
    assert cfg.data.transform.resolution > 0


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "encode").glob("*.yaml")), ids=lambda p: p.name)
def test_encode_configs_resolve(path, tmp_path):
    assert load_config(EncodeConfig, path, _earlier_stages(path, tmp_path)).shard_size > 0


def _earlier_stages(path, tmp_path) -> list[str]:
    """Stand-ins for the directories a config reads from earlier stages (here: a trained CLIP)."""
    text = yaml.safe_load(path.read_text()).get("text", {})
    return [f"text.encoder={tmp_path}"] if text.get("encoder", "tiny") not in TEXT_PRESETS else []


def test_ldm_config_resolves_with_existing_dirs(tmp_path):
    for path in sorted((ROOT / "configs" / "ldm").glob("*.yaml")):
        finetune = [f"model.pretrained={tmp_path}"] if "pretrained:" in path.read_text() else []  # a placeholder path there
        cfg = load_config(LDMTrainConfig, path, [f"cache={tmp_path}", f"vae={tmp_path}", *finetune, *_earlier_stages(path, tmp_path)])
        assert 0 <= cfg.caption_dropout < 1


def test_overrides_are_typed(tmp_path):
    cfg = load_config(VAETrainConfig, ROOT / "configs/vae/shapes_cpu.yaml",
                      ["train.lr=1e-4", "train.steps=7", "model.block_out_channels=[16,32,32]", "out_dir=x"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.model.block_out_channels == [16, 32, 32] and cfg.out_dir == "x"


@pytest.mark.parametrize("override, message", [
    (["train.stepz=3"], "train.stepz"),
    (["train.steps=abc"], "train.steps: expected an integer"),
    (["train.steps=0"], "train.steps must be > 0"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["loss.reconstruction=l3"], "loss.reconstruction"),
    (["data.transform.resolution=65"], "not divisible by the VAE's downsampling factor"),
    (["loss.perceptual_weight=1.0"], "loss.perceptual_weight=0"),
    (["data.transform.flip=true"], "flip"),
    (["train.num_workers=4"], "train.num_workers was removed: no DataLoader reads it"),
    (["data.captions.prefix=sks"], "data.captions: the VAE trains on images alone"),
    (["train.log_every=0"], "train.log_every must be >= 1"),
])
def test_bad_vae_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(VAETrainConfig, ROOT / "configs/vae/shapes_cpu.yaml", override)


def test_impossible_ldm_combinations(tmp_path):
    base = [f"cache={tmp_path}", f"vae={tmp_path}"]
    with pytest.raises(ConfigError, match="zero_terminal_snr needs noise.prediction_type=v_prediction"):
        load_config(LDMTrainConfig, None, base + ["noise.zero_terminal_snr=true"])
    with pytest.raises(ConfigError, match="caption_dropout"):
        load_config(LDMTrainConfig, None, base + ["caption_dropout=1.5"])
    with pytest.raises(ConfigError, match="no latent cache directory"):
        load_config(LDMTrainConfig, None, [f"cache={tmp_path / 'nope'}", f"vae={tmp_path}"])


def test_the_encode_stage_refuses_caption_settings_it_would_ignore(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.captions: the cache keeps captions as they are"):
        load_config(EncodeConfig, None, ["data.captions.shuffle_tags=true"])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(VAETrainConfig, tmp_path / "missing.yaml")
