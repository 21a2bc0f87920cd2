"""Tokenizer, text encoders and prompt encoding (ldm.models.text), against open_clip and diffusers."""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
import yaml
from open_clip.tokenizer import basic_clean
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.models.conditioning import TextEncoderConfig, load_text
from ldm.models.text import (
    EOS_ID,
    TEXT_PRESETS,
    build_text_encoder,
    build_tokenizer,
    encode_prompts,
    load_openclip_text_encoder,
    load_text_encoder,
    openclip_to_clip_text_model,
    without_skipped_layers,
)
from ldm.train.ldm import train_ldm

from fixtures_runs import latents, ldm_cfg  # noqa: F401  (fixture)

CAPTIONS = [
    "a photo of a cat",
    "A red circle on a blue background.",
    "two green squares, one small triangle",
    "Hello, World!!!",
    "wow! amazing!! incredible!!!",
    "an astronaut riding a horse on mars, 4k, highly detailed",
    "portrait of a woman, oil painting, by Rembrandt van Rijn (1606-1669)",
    "1234567890",
    "3.14159 is pi; e = 2.71828...",
    "price: $19.99 (50% off) #deal @store",
    "it's a dog's life, isn't it? they'll say we've done what I'm told you'd do",
    "UPPER CASE and MiXeD cAsE",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed",
    "multiple     spaces    between words",
    "naïve café résumé",
    "Über straße größe",
    "日本語のテキスト",
    "中文字符测试",
    "한국어 문장",
    "Привет, мир!",
    "Γειά σου κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "emoji 🐱🐶 test 🚀✨",
    "flags 🇺🇸🇯🇵 and skin tones 👍🏽",
    "math: x² + y² = z², ∑∫√∞",
    "arrows → ← ↑ ↓ and bullets • ·",
    "quotes \"double\" and 'single'",
    "brackets [square] {curly} <angle> (round)",
    "path/to/file.png and C:\\windows\\system32",
    "email me at someone@example.com or https://example.com/page?x=1&y=2",
    "hyphen-ated well-known state-of-the-art",
    "under_score_words and CamelCaseWords",
    "a.b.c.d e,f,g;h:i",
    "--- *** ### ~~~ ^^^ ||| ```",
    "a",
    "",
    "!",
    "the end.",
    "<|endoftext|> inside text",
    "<|startoftext|>also this",
    "1st 2nd 3rd 4th 21st 100th",
    "1,000,000 and 1.5e-3 and 0x1F",
    "a cat, a dog, a bird, a fish, a horse, a cow, a pig",
    "trending on artstation, unreal engine, octane render, 8k uhd",
    "masterpiece, best quality, (detailed:1.2), [blurry]",
    "a very long caption " + "with many repeated words " * 30,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 300,
    " ".join(str(i) for i in range(100)),
    "🙂" * 80,
    "café " * 40,
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ",
    "mañana en la montaña",
    "ça va? oui, très bien.",
]


def _ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Tokenize the way diffusers' pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_tokenizer()


@pytest.fixture(scope="module")
def encoder() -> CLIPTextModel:
    return build_text_encoder("tiny", seed=0)


# ------------------------------------------------------------------ tokenizer


def test_openclip_style_padding_gives_open_clip_ids_exactly():
    assert len(CAPTIONS) >= 50
    ids = _ids(build_tokenizer(pad_token="!"), CAPTIONS)
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS))


def test_sd1_padding_pads_with_endoftext_after_the_same_tokens(tokenizer):
    ids, ref = _ids(tokenizer, CAPTIONS), open_clip.tokenize(CAPTIONS)
    assert tokenizer.pad_token_id == EOS_ID and len(tokenizer) == 49408
    for row, ref_row, caption in zip(ids, ref, CAPTIONS):
        n = int((ref_row != 0).sum())  # open_clip pads with 0 ("!")
        assert torch.equal(row[:n], ref_row[:n]), caption
        assert (row[n:] == EOS_ID).all(), caption


def test_truncation_keeps_endoftext_last(tokenizer):
    ids = _ids(tokenizer, ["a very long caption " * 50, "short"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == EOS_ID and (ids[0, 1:-1] != EOS_ID).all()
    assert ids[1, :3].tolist() == open_clip.tokenize("short")[0, :3].tolist()
    assert (ids[1, 3:] == EOS_ID).all()


def test_exclamation_mark_is_text_not_padding_when_padding_with_it():
    """SD-2.x padding with "!" must not turn "!" in a prompt into the pad id (diffusers #4153)."""
    ids = _ids(build_tokenizer(pad_token="!"), ["! !! !!!"])[0]
    assert ids[:5].tolist() == [49406, 256, 748, 995, EOS_ID]
    assert (ids[5:] == 0).all()


def test_ftfy_and_html_cleaning_is_the_only_difference():
    """transformers' CLIPTokenizer skips open_clip's ftfy/html clean-up; after it, ids agree."""
    texts = ["Tom &amp; Jerry", "‘curly’ “quotes”", "ﬁsh ﬂower", "ＦＵＬＬ width", "mojibake cafÃ©"]
    cleaned = _ids(build_tokenizer(pad_token="!"), [basic_clean(t) for t in texts])
    assert torch.equal(cleaned, open_clip.tokenize(texts))


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    build_tokenizer(pad_token="!").save_pretrained(tmp_path / "tokenizer")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)
    assert reloaded.pad_token_id == 0
    assert torch.equal(_ids(reloaded, CAPTIONS), open_clip.tokenize(CAPTIONS))


def test_pad_token_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="<pad>"):
        build_tokenizer(pad_token="<pad>")


# ------------------------------------------------------------------ encoders


def test_build_text_encoder_is_seeded_and_frozen():
    a, b, c = build_text_encoder("tiny", 0), build_text_encoder("tiny", 0), build_text_encoder("tiny", 1)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert a.config.hidden_size == 64 and a.config.num_hidden_layers == 2


@pytest.mark.parametrize("preset", sorted(TEXT_PRESETS))
def test_presets_are_valid_clip_text_configs(preset):
    config = CLIPTextConfig(**TEXT_PRESETS[preset])
    assert config.vocab_size == 49408 and config.max_position_embeddings == 77
    assert config.hidden_size % config.num_attention_heads == 0


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'huge'"):
        build_text_encoder("huge")


def test_encode_prompts_shape_and_clip_skip(encoder, tokenizer):
    last = encode_prompts(encoder, tokenizer, ["a red circle", "a blue square"])
    assert last.shape == (2, 77, 64)
    # clip_skip=1 = the output of the layer before the last, through the final LayerNorm:
    # the same as a copy of the encoder without its last layer.
    shorter = copy.deepcopy(encoder)
    shorter.encoder.layers = shorter.encoder.layers[:-1]
    skipped = encode_prompts(encoder, tokenizer, ["a red circle", "a blue square"], clip_skip=1)
    expected = encode_prompts(shorter, tokenizer, ["a red circle", "a blue square"])
    torch.testing.assert_close(skipped, expected)
    assert not torch.allclose(skipped, last)


def test_clip_skip_of_every_layer_gives_each_word_alone(encoder, tokenizer):
    """clip_skip = the number of layers: the embeddings under the final LayerNorm, so a token's
    vector is the same whatever words come before it."""
    n = encoder.config.num_hidden_layers
    embedded = encode_prompts(encoder, tokenizer, ["a red star", "a blue star"], clip_skip=n)
    no_layers = copy.deepcopy(encoder)
    no_layers.encoder.layers = no_layers.encoder.layers[:0]
    torch.testing.assert_close(embedded, encode_prompts(no_layers, tokenizer, ["a red star", "a blue star"]))
    star = len(tokenizer("a red star").input_ids) - 2  # <start> a red star <end>: the word's place
    torch.testing.assert_close(embedded[0, star], embedded[1, star])
    assert not torch.allclose(embedded[0, star - 1], embedded[1, star - 1])  # red, blue
    contextual = encode_prompts(encoder, tokenizer, ["a red star", "a blue star"])
    assert not torch.allclose(contextual[0, star], contextual[1, star])


def test_without_skipped_layers_folds_clip_skip_into_the_encoder(encoder, tokenizer):
    prompts = ["a red star", "two blue squares"]
    full = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert without_skipped_layers(encoder, 0) is encoder
    for clip_skip in range(1, encoder.config.num_hidden_layers + 1):
        shorter = without_skipped_layers(encoder, clip_skip)
        assert shorter.config.num_hidden_layers == encoder.config.num_hidden_layers - clip_skip
        torch.testing.assert_close(encode_prompts(shorter, tokenizer, prompts),
                                   encode_prompts(encoder, tokenizer, prompts, clip_skip=clip_skip), rtol=0, atol=0)
    assert all(torch.equal(v, full[k]) for k, v in encoder.state_dict().items()) and len(full) == len(encoder.state_dict())
    with pytest.raises(ValueError, match="clip_skip=3"):
        without_skipped_layers(encoder, 3)


def test_encode_prompts_refuses_bad_input(encoder, tokenizer):
    with pytest.raises(ValueError, match="clip_skip=3"):
        encode_prompts(encoder, tokenizer, ["x"], clip_skip=3)
    with pytest.raises(TypeError, match="list"):
        encode_prompts(encoder, tokenizer, "x")


def _tiny_pipeline(text_encoder, tokenizer):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_pipeline_directory_round_trip_matches_diffusers(tmp_path, encoder, tokenizer):
    from diffusers import StableDiffusionPipeline
    prompts = ["a red circle", "two blue squares!"]
    _tiny_pipeline(encoder, tokenizer).save_pretrained(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)

    loaded, loaded_tok = load_text_encoder(tmp_path)
    ours = encode_prompts(loaded, loaded_tok, prompts)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours, encode_prompts(encoder, tokenizer, prompts))


def test_plain_model_directory_gets_an_offline_tokenizer(tmp_path, encoder):
    encoder.save_pretrained(tmp_path)
    loaded, tok = load_text_encoder(tmp_path, pad_token="!")
    assert tok.pad_token_id == 0 and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder(tmp_path / "missing")


# ------------------------------------------------------------------ OpenCLIP


TINY_OPENCLIP = dict(
    embed_dim=32, quick_gelu=False,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=4, layers=3),
)


def _random_openclip(cfg: dict = TINY_OPENCLIP) -> open_clip.CLIP:
    """A tiny OpenCLIP with every LayerNorm and bias moved off its init, so a mixed-up mapping shows."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name or "bias" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _openclip_block_outputs(model: open_clip.CLIP, ids: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of each residual block of open_clip's text transformer, as in CLIP.encode_text."""
    x = model.token_embedding(ids) + model.positional_embedding
    outs = []
    for block in model.transformer.resblocks:
        x = block(x, attn_mask=model.attn_mask)
        outs.append(x)
    return outs


def test_openclip_conversion_matches_every_layer():
    model = _random_openclip()
    converted = openclip_to_clip_text_model(model)
    ids = open_clip.tokenize(["a photo of a cat!", "two red squares", ""])
    with torch.no_grad():
        out = converted(ids, output_hidden_states=True)
        blocks = _openclip_block_outputs(model, ids)
        for i, ref in enumerate(blocks):
            torch.testing.assert_close(out.hidden_states[i + 1], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.last_hidden_state, model.ln_final(blocks[-1]), atol=1e-5, rtol=0)
        pooled = out.pooler_output @ model.text_projection
        torch.testing.assert_close(pooled, model.encode_text(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix,prefix", [(".safetensors", "module."), (".bin", "")])
def test_load_openclip_checkpoint_gives_sd2_penultimate_conditioning(tmp_path, suffix, prefix):
    model = _random_openclip()
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"open_clip{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)

    encoder, tokenizer = load_openclip_text_encoder(path, TINY_OPENCLIP, layer="penultimate")
    assert encoder.config.num_hidden_layers == 2 and tokenizer.pad_token_id == 0
    prompts = ["a photo of a cat!", "two red squares"]
    with torch.no_grad():
        # FrozenOpenCLIPEmbedder(layer="penultimate"): all blocks but the last, then ln_final.
        expected = model.ln_final(_openclip_block_outputs(model, open_clip.tokenize(prompts))[-2])
        torch.testing.assert_close(encode_prompts(encoder, tokenizer, prompts), expected, atol=1e-5, rtol=0)


def test_openclip_options_without_a_clip_counterpart_are_refused():
    layer_scaled = dict(TINY_OPENCLIP, text_cfg=dict(TINY_OPENCLIP["text_cfg"], ls_init_value=0.1))
    with pytest.raises(ValueError, match="ls_1"):
        openclip_to_clip_text_model(open_clip.CLIP(**layer_scaled))
    with pytest.raises(ValueError, match="model_cfg"):
        openclip_to_clip_text_model(_random_openclip().state_dict())


def _save_openclip_training_checkpoint(model: open_clip.CLIP, root) -> tuple:
    """(checkpoint, model config JSON) as open_clip's training leaves them: a torch.save'd dict
    whose state_dict has DDP's "module." prefix, and the architecture in its JSON format."""
    checkpoint, model_json = root / "epoch_1.pt", root / "tiny-openclip.json"
    torch.save({"epoch": 1, "name": "tiny-openclip",
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, checkpoint)
    model_json.write_text(json.dumps(TINY_OPENCLIP))
    return checkpoint, model_json


def test_stage3_export_with_an_openclip_text_encoder_is_an_sd2_style_diffusers_pipeline(tmp_path, latents):  # noqa: F811
    from diffusers import StableDiffusionPipeline
    model = _random_openclip()
    checkpoint, model_json = _save_openclip_training_checkpoint(model, tmp_path)
    # What a user writes: stage 3 with text.openclip_checkpoint / text.openclip_model, then its export.
    train_ldm(ldm_cfg(tmp_path / "run", latents, "text.encoder=", f"text.openclip_checkpoint={checkpoint}",
                      f"text.openclip_model={model_json}", "train.steps=1", "train.save_every=0"))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["text"]
    assert saved["openclip_checkpoint"] == str(checkpoint) and saved["encoder"] == ""  # not a preset it never used
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", local_files_only=True)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and pipe.text_encoder.config.num_hidden_layers == 2
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer.pad_token_id == 0

    prompts = ["a red circle on the left!", "two blue squares", ""]
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    with torch.no_grad():
        # SD-2's FrozenOpenCLIPEmbedder(layer="penultimate") on open_clip's own tokens
        expected = model.ln_final(_openclip_block_outputs(model, open_clip.tokenize(prompts))[-2])
    torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=0)

    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_stage3_folds_clip_skip_into_its_export(tmp_path, latents):  # noqa: F811
    """Trained with text.clip_skip=1, the export's text encoder is one layer shorter and ldm.json says 0:
    plain diffusers, which gets no clip_skip, encodes prompts as the U-Net was trained on them."""
    from diffusers import StableDiffusionPipeline
    train_ldm(ldm_cfg(tmp_path / "run", latents, "text.clip_skip=1", "train.steps=1", "train.save_every=0"))
    record = json.loads((tmp_path / "run" / "pipeline" / "ldm.json").read_text())
    assert record["clip_skip"] == 0 and record["clip_skip_folded"] == 1
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", local_files_only=True)
    tiny = build_text_encoder("tiny")
    assert pipe.text_encoder.config.num_hidden_layers == tiny.config.num_hidden_layers - 1
    prompts = ["a red star on the left", ""]
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(theirs, encode_prompts(tiny, pipe.tokenizer, prompts, clip_skip=1), rtol=0, atol=1e-6)


def test_openclip_text_config_names_its_architecture_by_json_and_keeps_max_length(tmp_path):
    model = _random_openclip()
    checkpoint, model_json = _save_openclip_training_checkpoint(model, tmp_path)
    cfg = TextEncoderConfig(openclip_checkpoint=str(checkpoint), openclip_model=str(model_json), max_length=16)
    cfg.validate()
    encoder, tokenizer = load_text(cfg)
    assert tokenizer.model_max_length == 16
    with torch.no_grad():
        expected = model.ln_final(_openclip_block_outputs(model, open_clip.tokenize(["a cat"]))[-2])[:, :16]
        torch.testing.assert_close(encode_prompts(encoder, tokenizer, ["a cat"]), expected, atol=1e-5, rtol=0)
    # open_clip's hub layout ({"model_cfg": ...}) reads too; a wrong name or a missing file is a config error
    hub_json = tmp_path / "open_clip_config.json"
    hub_json.write_text(json.dumps({"model_cfg": TINY_OPENCLIP, "preprocess_cfg": {}}))
    hub_cfg = TextEncoderConfig(openclip_checkpoint=str(checkpoint), openclip_model=str(hub_json))
    assert load_text(hub_cfg)[0].config.hidden_size == 48
    from ldm.config import ConfigError
    with pytest.raises(ConfigError, match="text.encoder='sd2' and text.openclip_checkpoint are both set"):
        TextEncoderConfig(encoder="sd2", openclip_checkpoint=str(checkpoint), openclip_model=str(model_json)).validate()
    for name, message in (("ViT-Nope", "unknown open_clip architecture"),
                          (str(tmp_path / "missing.json"), "no open_clip model config")):
        with pytest.raises(ConfigError, match=message):
            TextEncoderConfig(openclip_checkpoint=str(checkpoint), openclip_model=name).validate()
