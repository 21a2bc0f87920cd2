"""Round trips between a diffusers pipeline directory and the original single-file layout.

Tiny models built from the presets, CPU, no network (run with HF_HUB_OFFLINE=1).
"""

import json

import pytest
import torch
import yaml
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.export import (detect_variant, export_single_file, import_single_file,
                        infer_configs, infer_text_encoder_config, load_checkpoint)
from ldm.models.presets import (SD_SCHEDULER_CONFIG, UNET_PRESETS, VAE_PRESETS,
                                unet_config, vae_config)
from ldm.models.text import EOS_TOKEN, TEXT_PRESETS, build_tokenizer

MODELS = ("unet", "vae", "text_encoder")
# SD-1.x text encoders are OpenAI CLIP (quick_gelu), SD-2.x OpenCLIP (gelu): the export picks
# the original key layout from that.
LAYOUTS = {"clip": ("quick_gelu", EOS_TOKEN), "open_clip": ("gelu", "!")}
TRAINING_RECORD = {"preset": "tiny", "steps": 2}


def _tiny_configs(layout: str) -> dict[str, dict]:
    act, pad = LAYOUTS[layout]
    return {
        "unet": unet_config("tiny"),
        "vae": vae_config("tiny-f4"),
        "text_encoder": {**TEXT_PRESETS["tiny"], "hidden_act": act},
        "scheduler": {"_class_name": "DDIMScheduler", **SD_SCHEDULER_CONFIG, "set_alpha_to_one": False},
        "tokenizer": {"pad_token": pad, "model_max_length": 77, "vocab_size": 49408},
    }


def _save_tiny_pipeline(layout: str, path):
    """Save a tiny StableDiffusionPipeline at `path`, with an ldm record file beside its components."""
    cfg = _tiny_configs(layout)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        tokenizer=build_tokenizer(77, cfg["tokenizer"]["pad_token"]),
        unet=UNet2DConditionModel(**cfg["unet"]),
        scheduler=DDIMScheduler.from_config(cfg["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    (path / "ldm_train.json").write_text(json.dumps(TRAINING_RECORD))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(layout) -> (pipeline dir, its single-file export), each built once per module."""
    built = {}

    def get(layout: str):
        if layout not in built:
            path = tmp_path_factory.mktemp(f"pipe-{layout}")
            _save_tiny_pipeline(layout, path)
            built[layout] = path, export_single_file(path, path.parent / f"{layout}.safetensors")
        return built[layout]
    return get


def _load(path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(path, local_files_only=True)


def _assert_same_weights(a: StableDiffusionPipeline, b: StableDiffusionPipeline) -> None:
    for name in MODELS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        unequal = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not unequal, f"{name}: {unequal[:5]}"


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _as_foreign(path, out, layout: str):
    """`path` as others' SD checkpoints look: no metadata, and tensors SD never uses."""
    state, _ = load_checkpoint(path)
    state |= {"alphas_cumprod": torch.linspace(1, 0, 1000), "model_ema.decay": torch.tensor(0.9999)}
    if layout == "clip":
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        state |= {"cond_stage_model.model.text_projection": torch.randn(64, 64),
                  "cond_stage_model.model.logit_scale": torch.tensor(4.6)}
    save_file(state, out)
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_keeps_every_weight_config_and_record(tiny, layout, tmp_path):
    pipeline_dir, exported = tiny(layout)
    import_single_file(exported, out_dir=tmp_path / "back")
    original, back = _load(pipeline_dir), _load(tmp_path / "back")
    _assert_same_weights(original, back)
    for name in ("unet", "vae", "scheduler"):
        assert _public(getattr(back, name).config) == _public(getattr(original, name).config), name
    text_fields = ("hidden_act", "num_attention_heads", "num_hidden_layers", "max_position_embeddings")
    assert ({f: getattr(back.text_encoder.config, f) for f in text_fields}
            == {f: getattr(original.text_encoder.config, f) for f in text_fields})
    assert back.tokenizer.pad_token == original.tokenizer.pad_token
    assert json.loads((tmp_path / "back" / "ldm_train.json").read_text()) == TRAINING_RECORD


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_export_uses_the_original_key_layout(tiny, layout):
    pipeline_dir, exported = tiny(layout)
    with safe_open(exported, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert str(pipeline_dir) not in json.dumps(meta)  # no local paths travel
        attn_q = f.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight")
        tokens = f.get_tensor(next(k for k in keys if k.endswith("token_embedding.weight")))
    assert {"model.diffusion_model.input_blocks.0.0.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "model.diffusion_model.input_blocks.2.0.op.weight",        # level 0's downsampler
            "model.diffusion_model.middle_block.1.proj_in.weight",
            "model.diffusion_model.output_blocks.1.1.conv.weight",     # upsampler, no attention
            "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
            "model.diffusion_model.out.2.weight",
            "first_stage_model.encoder.conv_in.weight",
            "first_stage_model.encoder.down.0.downsample.conv.weight",
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
            "first_stage_model.encoder.norm_out.weight",
            "first_stage_model.quant_conv.weight"} <= keys
    # The original VAE's attention is 1x1 convolutions: (C, C, 1, 1), not diffusers' Linear.
    assert attn_q.shape == (16, 16, 1, 1)
    assert not any(part in k for k in keys for part in ("down_blocks", "up_blocks", "mid_block", "resnets"))
    assert tokens.shape == (49408, 64)
    if layout == "clip":
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
        assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    else:
        p = "cond_stage_model.model."
        assert {p + "positional_embedding", p + "transformer.resblocks.0.attn.in_proj_weight",
                p + "ln_final.weight"} <= keys
    assert json.loads(meta["ldm.unet"])["block_out_channels"] == [32, 64]
    assert json.loads(meta["ldm.file.ldm_train.json"]) == TRAINING_RECORD


def test_open_clip_layout_adds_an_identity_block_for_sd2_readers(tiny):
    pipeline_dir, exported = tiny("open_clip")
    text = _load(pipeline_dir).text_encoder
    layers, hidden = text.config.num_hidden_layers, text.config.hidden_size
    p = "cond_stage_model.model.transformer.resblocks."
    with safe_open(exported, "pt") as f:
        in_proj = f.get_tensor(f"{p}0.attn.in_proj_weight")
        pad = {k: f.get_tensor(k) for k in f.keys() if k.startswith(f"{p}{layers}.")}
        assert not any(k.startswith(f"{p}{layers + 1}.") for k in f.keys())
    q = next(v for k, v in text.state_dict().items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert in_proj.shape == (3 * hidden, hidden) and torch.equal(in_proj[:hidden], q)
    assert len(pad) == 12 and all(not t.any() for t in pad.values())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_diffusers_from_single_file_reads_the_export(tiny, layout):
    pipeline_dir, exported = tiny(layout)
    theirs = StableDiffusionPipeline.from_single_file(exported, config=str(pipeline_dir), local_files_only=True)
    _assert_same_weights(_load(pipeline_dir), theirs)


def test_same_seed_same_image_after_round_trip(tiny):
    pipeline_dir, exported = tiny("clip")
    original, back = _load(pipeline_dir), import_single_file(exported)

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(7)).images

    a, b = image(original), image(back)
    assert a.shape == (1, 3, 32, 32) and a.dtype == torch.float32
    assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_file_without_metadata_imports_with_config_hints(tiny, layout, tmp_path):
    pipeline_dir, exported = tiny(layout)
    stripped = _as_foreign(exported, tmp_path / "foreign.safetensors", layout)
    state, metadata = load_checkpoint(stripped)
    assert not any(k.startswith("ldm.") for k in metadata)
    assert detect_variant(state) == ("sd1" if layout == "clip" else "sd2")
    # Shapes alone give the text encoder's size (the OpenCLIP layout's extra block is not a layer).
    inferred = infer_text_encoder_config(state)
    assert (inferred["hidden_size"], inferred["num_hidden_layers"], inferred["intermediate_size"]) == (64, 2, 256)
    back = import_single_file(stripped, configs=_tiny_configs(layout))
    _assert_same_weights(_load(pipeline_dir), back)
    assert back.tokenizer.pad_token == LAYOUTS[layout][1]


def test_v_prediction_and_zero_snr_travel_as_the_web_uis_read_them(tiny, tmp_path):
    """ComfyUI reads the `v_pred` and `ztsnr` keys; A1111 and Forge read `<name>.yaml` beside the file."""
    pipeline_dir, _ = tiny("clip")  # SD-1 shaped: nothing but the keys says v-prediction
    vpred = tmp_path / "vpred"
    pipe = _load(pipeline_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                               rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe.save_pretrained(vpred)
    exported = export_single_file(vpred, tmp_path / "model.safetensors", dtype=torch.float16)

    with safe_open(exported, framework="pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys()) and f.get_tensor("v_pred").numel() == 0
    config = yaml.safe_load((tmp_path / "model.yaml").read_text())["model"]["params"]
    assert config["parameterization"] == "v" and config["scale_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    unet = config["unet_config"]["params"]
    assert (unet["model_channels"], unet["channel_mult"], unet["context_dim"]) == (32, [1, 2], 64)
    assert config["cond_stage_config"]["target"].endswith("FrozenCLIPEmbedder")

    # read back: our own import, and a foreign file with only the keys to go by
    back = import_single_file(exported)
    assert back.scheduler.config.prediction_type == "v_prediction" and back.scheduler.config.rescale_betas_zero_snr
    foreign = import_single_file(_as_foreign(exported, tmp_path / "foreign.safetensors", "clip"),
                                 configs={k: v for k, v in _tiny_configs("clip").items() if k != "scheduler"})
    assert foreign.scheduler.config.prediction_type == "v_prediction" and foreign.scheduler.config.rescale_betas_zero_snr

    # an epsilon model exported over it takes the stale yaml away, and carries no markers
    export_single_file(pipeline_dir, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.yaml").exists()
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert not {"v_pred", "ztsnr"} & set(f.keys())


def test_a_wrong_config_hint_names_the_component(tiny, tmp_path):
    layout = "clip"
    _, exported = tiny(layout)
    stripped = _as_foreign(exported, tmp_path / "foreign.safetensors", layout)
    hints = {**_tiny_configs(layout), "vae": vae_config("tiny-f8")}  # one level too many
    with pytest.raises(ValueError, match="vae: the checkpoint does not fit"):
        import_single_file(stripped, configs=hints)
    with pytest.raises(ValueError, match="unknown component"):
        import_single_file(exported, configs={"unets": {}})


def test_float16_export_halves_the_weights(tiny, tmp_path):
    pipeline_dir, _ = tiny("clip")
    path = export_single_file(pipeline_dir, tmp_path / "half.safetensors", dtype=torch.float16)
    state, _ = load_checkpoint(path)
    assert {t.dtype for t in state.values()} == {torch.float16}
    back = import_single_file(path)
    conv_in = _load(pipeline_dir).unet.conv_in.weight
    assert torch.equal(back.unet.conv_in.weight, conv_in.half().float())


def test_export_refuses_bad_arguments(tiny, tmp_path):
    pipeline_dir, _ = tiny("clip")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_single_file(pipeline_dir, tmp_path / "model.ckpt")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        export_single_file(tmp_path, tmp_path / "model.safetensors")


def test_metadata_cannot_write_outside_out_dir(tiny, tmp_path):
    _, exported = tiny("clip")
    state, meta = load_checkpoint(exported)
    save_file(state, tmp_path / "evil.safetensors", metadata={**meta, "ldm.file.../ldm_x.json": "{}"})
    with pytest.raises(ValueError, match="expected a bare"):
        import_single_file(tmp_path / "evil.safetensors", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickled_checkpoint_needs_allow_pickle(tiny, tmp_path):
    layout = "clip"
    pipeline_dir, exported = tiny(layout)
    state, _ = load_checkpoint(exported)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, ckpt)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        import_single_file(ckpt, configs=_tiny_configs(layout))
    back = import_single_file(ckpt, allow_pickle=True, configs=_tiny_configs(layout))
    _assert_same_weights(_load(pipeline_dir), back)


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hook": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        import_single_file(evil)
    with pytest.raises(ValueError, match="weights_only"):
        import_single_file(evil, allow_pickle=True)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler runs it.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "ran"


def _meta(*shape):
    return torch.empty(shape, device="meta")


def _sd_shaped(variant: str) -> dict:
    """Key/shape skeletons of original SD-1.x / SD-2.x checkpoints (meta tensors: no memory)."""
    context = 768 if variant == "sd1" else 1024
    state = {"model.diffusion_model.input_blocks.0.0.weight": _meta(320, 4, 3, 3),
             "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": _meta(320, context),
             "first_stage_model.encoder.conv_in.weight": _meta(128, 3, 3, 3)}
    if variant == "sd1":
        p = "cond_stage_model.transformer.text_model."
        state |= {p + "embeddings.token_embedding.weight": _meta(49408, 768),
                  p + "embeddings.position_embedding.weight": _meta(77, 768)}
        state |= {p + f"encoder.layers.{i}.mlp.fc1.weight": _meta(3072, 768) for i in range(12)}
    else:
        p = "cond_stage_model.model."
        state |= {p + "token_embedding.weight": _meta(49408, 1024), p + "positional_embedding": _meta(77, 1024)}
        state |= {p + f"transformer.resblocks.{i}.mlp.c_fc.weight": _meta(4096, 1024) for i in range(24)}
    return state


def test_sd1_checkpoint_is_detected_with_the_published_configs():
    configs = infer_configs(_sd_shaped("sd1"))
    assert configs["unet"] == UNET_PRESETS["sd15"] and configs["vae"] == VAE_PRESETS["kl-f8"]
    text = configs["text_encoder"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["intermediate_size"], text["hidden_act"]) == (768, 12, 12, 3072, "quick_gelu")
    assert configs["scheduler"]["prediction_type"] == "epsilon"
    assert configs["tokenizer"]["pad_token"] == EOS_TOKEN


def test_sd2_checkpoint_uses_the_penultimate_open_clip_layer():
    configs = infer_configs(_sd_shaped("sd2"))
    assert configs["unet"] == UNET_PRESETS["sd2"]
    text = configs["text_encoder"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["hidden_act"]) == (1024, 23, 16, "gelu")
    assert configs["scheduler"]["prediction_type"] == "v_prediction"
    assert configs["tokenizer"]["pad_token"] == "!"


def test_detection_refuses_what_is_not_sd1_or_sd2():
    with pytest.raises(ValueError, match="no model.diffusion_model"):
        detect_variant({"first_stage_model.encoder.conv_in.weight": _meta(128, 3, 3, 3)})
    sdxl = {**_sd_shaped("sd1"), "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": _meta(1280)}
    with pytest.raises(ValueError, match="xl_base"):
        detect_variant(sdxl)
    unet_only = {k: v for k, v in _sd_shaped("sd1").items() if not k.startswith("cond_stage_model")}
    with pytest.raises(ValueError, match="no text encoder"):
        detect_variant(unet_only)


def test_presets_are_the_published_sizes():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**unet_config("sd15"))
        kl_f8 = AutoencoderKL(**vae_config("kl-f8"))
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964     # SD-1.5's UNet
    assert sum(p.numel() for p in kl_f8.parameters()) == 83_653_863     # SD's VAE
    assert vae_config("kl-f8", block_out_channels=(8, 16))["down_block_types"] == ("DownEncoderBlock2D",) * 2
    for name in ("kl-f2", "kl-f4", "kl-f8", "kl-f16"):  # the name is the spatial downsampling factor
        with torch.device("meta"):
            vae = AutoencoderKL(**vae_config(name))
        latent = vae.encoder(torch.zeros(1, 3, 32, 32, device="meta"))
        assert latent.shape[-1] == 32 // int(name.removeprefix("kl-f")), name
    with pytest.raises(ValueError, match="unknown UNet preset 'sd3'"):
        unet_config("sd3")
    with pytest.raises(ValueError, match=r"\['widht'\]"):
        vae_config("kl-f8", widht=3)
