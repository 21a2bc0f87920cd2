"""A single-file SD checkpoint where a diffusers directory is expected (ldm.single_file):
imported once per file version, under a lock, resolved at a stage's entry (the models layer reads
directories only), and refused with a way out when pickled."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import ldm.export
from ldm.config import ConfigError
from ldm.export import export_single_file
from ldm.infer import main as infer_main
from ldm.models.presets import unet_config, vae_config
from ldm.models.conditioning import TextEncoderConfig
from ldm.models.text import TEXT_PRESETS, build_tokenizer, load_text_encoder
from ldm.models.unet import UNetModelConfig, load_unet
from ldm.models.vae import VAEModelConfig, load_vae
from ldm.single_file import imported_dir, model_dir, model_path_problem, resolve_models
from ldm.train.encode import EncodeConfig
from ldm.train.ldm import finetune_source


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny SD pipeline dir, its single-file export)."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(3)
    StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config("tiny-f4", scaling_factor=1.5)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS["tiny"])), tokenizer=build_tokenizer(),
        unet=UNet2DConditionModel(**unet_config("tiny")),
        # steps_offset=1 as SD's own configs: StableDiffusionPipeline warns of (and rewrites) any other value
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(root / "pipeline")
    return root / "pipeline", export_single_file(root / "pipeline", root / "model.safetensors")


@pytest.fixture
def imports(monkeypatch, tmp_path) -> list[Path]:
    """Every import_single_file call's file, with the import cache in tmp_path."""
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    calls, real = [], ldm.export.import_single_file

    def counted(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ldm.export, "import_single_file", counted)
    return calls


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def test_each_loader_reads_the_file_as_its_directory_importing_it_once(checkpoint, imports, tmp_path):
    pipeline, file = checkpoint
    for load in (load_unet, load_vae):
        ours, theirs = state(load(model_dir(file))), state(load(pipeline))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    source = finetune_source(file)
    assert (source.path, source.vae, source.text_encoder) == (str(file), str(file), str(file))
    assert source.scheduler["prediction_type"] == "v_prediction" and source.scheduler_file == str(file)
    assert imports == [file.resolve()]
    assert model_dir(file).parent == tmp_path / "cache" / "single-file" and model_dir(pipeline) == pipeline

    # a new version of the file (another mtime) is imported afresh, into its own directory
    before = imported_dir(file)
    os.utime(file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert imported_dir(file) != before and len(imports) == 2


def test_processes_racing_for_one_file_import_it_once(checkpoint, imports, monkeypatch):
    _, file = checkpoint
    real = ldm.export.import_single_file

    def slow(path, *args, **kwargs):  # widen the window in which the others would start their own
        time.sleep(0.3)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ldm.export, "import_single_file", slow)
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(imported_dir(file))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(imports) == 1 and len(set(found)) == 1 and (found[0] / "model_index.json").is_file()
    assert not list(found[0].parent.glob("*.partial"))


def test_configs_take_the_file_and_refuse_pickles_and_missing_paths(checkpoint, tmp_path):
    _, file = checkpoint
    UNetModelConfig(pretrained=str(file)).validate()
    VAEModelConfig(pretrained=str(file)).validate()
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickled)
    with pytest.raises(ConfigError, match=r"model.pretrained: .*pickled checkpoint.*--allow-pickle --export-diffusers"):
        UNetModelConfig(pretrained=str(pickled)).validate()
    with pytest.raises(ConfigError, match="no such directory or .safetensors file"):
        VAEModelConfig(pretrained=str(tmp_path / "nothing.safetensors")).validate()
    (tmp_path / "notes.txt").write_text("not a model")
    assert "neither a diffusers directory nor a .safetensors checkpoint" in model_path_problem(tmp_path / "notes.txt")


def test_infer_exports_a_single_file_as_a_diffusers_directory(checkpoint, tmp_path, capsys):
    pipeline, file = checkpoint
    infer_main([str(file), "--export-diffusers", str(tmp_path / "out")])
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    back = StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    ours, theirs = state(back.unet), state(load_unet(pipeline))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(SystemExit, match="not a single file"):
        infer_main([str(pipeline), "--export-diffusers", str(tmp_path / "again")])


def test_the_models_layer_refuses_a_file_and_a_stage_resolves_it_once(checkpoint, imports):
    """Loaders read directories only (a file is refused, naming it and the way out); a stage's
    config is resolved at its entry, in a copy: the config it saves keeps the file's path."""
    pipeline, file = checkpoint
    for load in (load_unet, load_vae, load_text_encoder):
        with pytest.raises(ValueError, match=rf"{load.__name__}: .*{file.name} is a single-file checkpoint.*model_dir"):
            load(file)
    assert not imports  # refused before anything was imported
    cfg = EncodeConfig(vae=str(file), text=TextEncoderConfig(encoder=str(file)))
    models = resolve_models(cfg, "vae", "text.encoder")
    assert models.vae == models.text.encoder == str(model_dir(file)) and imports == [file.resolve()]
    assert cfg.vae == cfg.text.encoder == str(file)
    assert resolve_models(EncodeConfig(vae=str(pipeline)), "vae", "text.encoder").vae == str(pipeline)  # text: None
