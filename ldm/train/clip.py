"""Train a small CLIP on your own image-caption pairs; its text tower then conditions stage 3.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): an image tower and a text tower trained with the symmetric InfoNCE loss over
the batch (their Fig. 3), using open_clip's `CLIP` model and `ClipLoss`. Text is tokenized by
the offline tokenizer of `ldm.models.text`, the same one stage 3 uses, so the text tower sees
exactly the ids it will be asked to encode later.

Output (`<out_dir>/`):
  text_encoder/   the text tower as a transformers CLIPTextModel (save_pretrained, safetensors);
                  `load_text_encoder(<out_dir>)` and stage 3's `text.encoder: <out_dir>` read it
  tokenizer/      the CLIPTokenizer it was trained with (save_pretrained)
  image_encoder/  model.safetensors: the image tower (`visual.*`) and the two heads into the
                  joint space (`text_projection`, `logit_scale`); config.json: the open_clip
                  model config, image size and input range, and the resolved training config.
                  `load_clip_scorer(<out_dir>)` reads both for CLIP score / FID features.
  eval.json       held-out retrieval of the exported model, and `split` (which images were
                  held out, ldm.data.split); metrics.jsonl, config.yaml,
                  checkpoints/step-N/ (resume by re-running the same command)
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.transformer import text_global_pool
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.config import config_json, require
from ldm.data.captions import process_caption
from ldm.data.images import DataConfig, ImageStore, load_images
from ldm.models.text import EOS_TOKEN, build_tokenizer, load_text_encoder, openclip_to_clip_text_model
from ldm.safetensors_io import load_safetensors
from ldm.train.common import (register_schedule, LoopConfig, batch_indices, lr_lambda,
                              make_accelerator, make_optimizer, resume, start_run)
from ldm.train.loop import run_loop

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP paper sec. 2.5: the temperature is clipped so logits scale by <= 100


@dataclasses.dataclass
class ClipModelConfig:
    embed_dim: int = 128           # width of the joint image-text space
    image_width: int = 128         # ViT channels
    image_layers: int = 4          # ViT blocks
    image_head_width: int = 32     # channels per attention head (heads = width / head_width)
    patch_size: int = 8            # px, side of a ViT patch; must divide data.transform.resolution
    text_width: int = 128          # text transformer channels (the conditioning width stage 3 sees)
    text_layers: int = 4           # text transformer blocks
    text_heads: int = 4            # text attention heads
    quick_gelu: bool = False       # OpenAI CLIP's x * sigmoid(1.702 x) instead of GELU

    def validate(self) -> None:
        for name in ("embed_dim", "image_width", "image_layers", "image_head_width", "patch_size",
                     "text_width", "text_layers", "text_heads"):
            require(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        require(self.image_width % self.image_head_width == 0,
                f"model.image_width={self.image_width} is not a multiple of model.image_head_width={self.image_head_width}")
        require(self.text_width % self.text_heads == 0,
                f"model.text_width={self.text_width} is not a multiple of model.text_heads={self.text_heads}")


@dataclasses.dataclass
class ClipTrainConfig:
    out_dir: str = "runs/clip"     # run directory (see the module docstring for what lands in it)
    resume: str = "latest"         # "latest" (re-running the same command resumes), "" or a checkpoint path
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(eval_size=100))
    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    pad_token: str = "!"           # tokenizer padding: "!" (id 0, OpenCLIP / SD-2.x) or "<|endoftext|>" (SD-1.x)
    retrieval_candidates: int = 100  # held-out images (and their captions) ranked against each other in evaluation

    def validate(self) -> None:
        resolution = self.data.transform.resolution
        require(resolution % self.model.patch_size == 0,
                f"data.transform.resolution={resolution} px is not a multiple of model.patch_size={self.model.patch_size}")
        require(not self.data.transform.buckets, "data.transform.buckets: CLIP training takes square images only")
        require(self.retrieval_candidates >= 2, f"retrieval_candidates must be >= 2, got {self.retrieval_candidates}")
        count = self.data.eval_count  # None: chosen by fraction or list, checked once the images are read
        require(count is None or count >= self.retrieval_candidates,
                f"data.eval_size={count} held-out images are fewer than "
                f"retrieval_candidates={self.retrieval_candidates}")
        require(self.pad_token in ("!", EOS_TOKEN), f"pad_token must be '!' or {EOS_TOKEN!r}, got {self.pad_token!r}")
        # A contrastive loss over accumulated micro-batches is not the loss over their union
        # (each micro-batch only sees its own negatives), and EMA is not wired into this stage.
        require(self.train.grad_accum == 1, "train.grad_accum must be 1 for CLIP: raise train.batch_size instead")
        require(self.train.ema_decay == 0, "train.ema_decay: EMA is not used by the CLIP stage; set it to 0")


class ClipModel(open_clip.CLIP):
    """open_clip's CLIP, whose text tower runs only up to the batch's last <|endoftext|>.

    Captions are padded to 77 tokens (as stage 3 and diffusers' pipelines pad them), but the text
    tower is causal and pools at the <|endoftext|> token, so the positions after the batch's last one
    change no feature and no gradient. Cutting them leaves the model the same, and on short captions it
    shortens a training step by a third (shapes) to a half (the emoji presets). The weights, the export
    and open_clip's own CLIP class are unchanged; only the work is less.
    """

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.attn_mask is None or self.text_pool_type != "argmax" or not isinstance(self.text_projection, torch.nn.Parameter):
            # not causal, pooled elsewhere, or another head: every position, as open_clip runs it
            return super().encode_text(text, normalize=normalize)
        length = int(text.argmax(dim=-1).max()) + 1  # <|endoftext|> has the largest id, as argmax pooling assumes
        text = text[:, :length]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:length, :length]))
        x = text_global_pool(x, text, self.text_pool_type) @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def openclip_model_cfg(model: ClipModelConfig, image_size: int) -> dict:
    """The open_clip model config (the `model_cfg` of open_clip's JSON files) for `model`."""
    return {
        "embed_dim": model.embed_dim,
        "quick_gelu": model.quick_gelu,
        "vision_cfg": {"image_size": image_size, "layers": model.image_layers, "width": model.image_width,
                       "head_width": model.image_head_width, "patch_size": model.patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": model.text_width,
                     "heads": model.text_heads, "layers": model.text_layers},
    }


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """(B, 77) ids, padded and truncated the way stage 3 and diffusers' pipelines tokenize."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_clip(cfg: ClipTrainConfig) -> Path:
    """Train, export (text_encoder/, tokenizer/, image_encoder/), evaluate; returns out_dir."""
    out_dir = Path(cfg.out_dir)
    loop = cfg.train
    accelerator = make_accelerator(loop, out_dir)
    log = start_run(accelerator, cfg, out_dir, "clip")
    torch.manual_seed(loop.seed)

    # --- data: decoded once; the held-out split is used for retrieval
    train_set = load_images(cfg.data, "train", accelerator.process_index, accelerator.num_processes,
                            desc=None if accelerator.is_main_process else "")
    eval_set = load_images(cfg.data, "eval", desc="")
    if accelerator.is_main_process:
        print(train_set.report.summary())
    require(len(train_set) >= loop.batch_size, f"only {len(train_set)} usable training images, fewer than one batch")
    require(len(eval_set) >= cfg.retrieval_candidates,
            f"only {len(eval_set)} usable held-out images, fewer than retrieval_candidates={cfg.retrieval_candidates}")
    tokenizer = build_tokenizer(pad_token=cfg.pad_token)

    # --- model, loss (gathers features across processes so every rank sees all negatives)
    model_cfg = openclip_model_cfg(cfg.model, cfg.data.transform.resolution)
    model = ClipModel(**model_cfg)
    loss_fn = ClipLoss(gather_with_grad=accelerator.num_processes > 1, rank=accelerator.process_index,
                       world_size=accelerator.num_processes)
    optimizer = make_optimizer(model.parameters(), loop)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(loop))
    model, optimizer = accelerator.prepare(model, optimizer)
    register_schedule(accelerator, sched)
    clip = accelerator.unwrap_model(model)

    step, guard = resume(accelerator, out_dir, cfg.resume, loop.max_nonfinite_steps)
    # important: the data order is a function of (seed, step) only, so a resumed run sees
    # the batches it would have seen; so is the choice among an image's captions.
    batches = batch_indices(len(train_set), loop.batch_size, loop.seed, step)

    # --- the loop (ldm.train.loop.run_loop): each step, each retrieval evaluation, the export
    def train_step(step: int) -> dict:
        model.train()
        indices = next(batches)
        rng = random.Random(f"{loop.seed}-{step}-{accelerator.process_index}")
        texts = [process_caption(train_set.captions[i], cfg.data.captions, rng) for i in indices]
        images = train_set.batch(indices).to(accelerator.device)
        image_features, text_features, logit_scale = model(images, tokenize(tokenizer, texts).to(accelerator.device))
        loss = loss_fn(image_features, text_features, logit_scale)
        if guard.ok(loss):
            accelerator.backward(loss)
            if loop.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
            optimizer.step()
            sched.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "logit_scale": clip.logit_scale.detach().exp(), "lr": sched.get_last_lr()[0]}

    def evaluate(step: int) -> None:
        results = retrieval(*_features(clip, tokenizer, eval_set, cfg.retrieval_candidates))
        log.write(step, **{f"eval/{k}": v for k, v in results.items()})

    def export(step: int) -> None:
        """Export, then evaluate what was exported (so eval.json speaks for the files on disk)."""
        export_clip(clip, tokenizer, model_cfg, cfg, out_dir)
        scorer = load_clip_scorer(out_dir)
        results = evaluate_scorer(scorer, eval_set, cfg.retrieval_candidates)
        log.write(step, **{f"final/{k}": v for k, v in results.items()})
        results["split"] = eval_set.split  # which held-out images these figures come from
        (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
        print("clip eval:", json.dumps(results))

    run_loop(accelerator, loop, out_dir, log, guard, step, "clip", train_step, evaluate, export)
    return out_dir


def _eval_pairs(eval_set: ImageStore, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n held-out images ([-1, 1]) and one caption each (their first)."""
    return eval_set.batch(list(range(n))), [caps[0] if caps else "" for caps in eval_set.captions[:n]]


@torch.no_grad()
def _features(clip: open_clip.CLIP, tokenizer: CLIPTokenizer, eval_set: ImageStore, n: int):
    """Normalised features of the held-out pairs from the model being trained."""
    was_training = clip.training
    clip.eval()
    device = next(clip.parameters()).device
    images, captions = _eval_pairs(eval_set, n)
    image_features = clip.encode_image(images.to(device), normalize=True)
    text_features = clip.encode_text(tokenize(tokenizer, captions).to(device), normalize=True)
    clip.train(was_training)
    return image_features, text_features, captions


def retrieval(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Top-1/top-5 retrieval among the n held-out pairs, both ways (chance: 1/n).

    A retrieved caption counts as correct when its text equals the query image's own caption
    (two images can share one caption word for word, and then either is right).
    """
    n = len(captions)
    sim = image_features.float() @ text_features.float().T  # (images, captions)
    same = torch.tensor([[a == b for b in captions] for a in captions])
    k = min(5, n)
    i2t = same.gather(1, sim.topk(k, dim=1).indices)    # for each image, are its best captions right?
    t2i = same.gather(1, sim.T.topk(k, dim=1).indices)  # for each caption, are its best images right?
    return {"candidates": n, "i2t_top1": i2t[:, 0].float().mean().item(), "i2t_top5": i2t.any(1).float().mean().item(),
            "t2i_top1": t2i[:, 0].float().mean().item(), "t2i_top5": t2i.any(1).float().mean().item(),
            "chance_top1": 1.0 / n}


# ----------------------------------------------------------------------------- export / load


def export_clip(clip: open_clip.CLIP, tokenizer: CLIPTokenizer, model_cfg: dict, cfg: ClipTrainConfig, out_dir: Path) -> None:
    """Write text_encoder/, tokenizer/ and image_encoder/ (formats in the module docstring)."""
    text_encoder = openclip_to_clip_text_model(clip, model_cfg)
    text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    image_dir = out_dir / "image_encoder"
    image_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()
             if k.startswith("visual.") or k in ("text_projection", "logit_scale")}
    save_file(state, image_dir / "model.safetensors")
    meta = {"model_cfg": model_cfg, "image_size": cfg.data.transform.resolution, "image_range": [-1.0, 1.0],
            "train_config": json.loads(config_json(cfg))}
    (image_dir / "config.json").write_text(json.dumps(meta, indent=2))


class ClipScorer(torch.nn.Module):
    """A trained CLIP for scoring: image and text features in the joint space.

    `image_features` takes a list of PIL images, a uint8 (B, 3, H, W) tensor, or a float one
    in [-1, 1] (this project's image convention); other sizes are resized to the training size.
    `text_features` takes a list of strings. Both return (B, embed_dim), unnormalised unless
    `normalize=True`, as open_clip's encode_image / encode_text do.
    """

    def __init__(self, visual: torch.nn.Module, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 text_projection: torch.Tensor, logit_scale: torch.Tensor, image_size: int):
        super().__init__()
        self.visual, self.text_encoder, self.tokenizer = visual, text_encoder, tokenizer
        self.text_projection = torch.nn.Parameter(text_projection, requires_grad=False)
        self.logit_scale = torch.nn.Parameter(logit_scale, requires_grad=False)
        self.image_size = image_size

    def _pixels(self, images) -> torch.Tensor:
        device = self.text_projection.device
        if isinstance(images, (list, tuple)):
            if not all(isinstance(im, Image.Image) for im in images):
                raise TypeError("image_features: a list must hold PIL images")
            images = torch.stack([torch.from_numpy(_rgb_array(im)).permute(2, 0, 1) for im in images])
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise TypeError(f"image_features: expected PIL images or a (B, 3, H, W) tensor, got "
                            f"{getattr(images, 'shape', type(images))}")
        x = images.float().div(127.5).sub(1.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)
        return x.to(device)

    @torch.no_grad()
    def image_features(self, images, normalize: bool = False) -> torch.Tensor:
        features = self.visual(self._pixels(images))
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def text_features(self, texts: list[str], normalize: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("text_features: texts must be a list of strings, got a single str")
        ids = tokenize(self.tokenizer, texts).to(self.text_projection.device)
        # pooled = the final-LayerNorm'd state at the first <|endoftext|>: open_clip's argmax pooling
        features = self.text_encoder(ids).pooler_output @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_clip_scorer(path: str | Path, device: torch.device | str = "cpu") -> ClipScorer:
    """The CLIP that `train_clip` exported to `path` (its out_dir), frozen, for CLIP score / features."""
    root = Path(path)
    config_path = root / "image_encoder" / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root} holds no trained CLIP: {config_path} is missing (train_clip.py writes it)")
    meta = json.loads(config_path.read_text())
    state = load_safetensors(root / "image_encoder" / "model.safetensors")
    visual = open_clip.CLIP(**meta["model_cfg"]).visual
    visual.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    text_encoder, tokenizer = load_text_encoder(root)
    scorer = ClipScorer(visual, text_encoder, tokenizer, state["text_projection"], state["logit_scale"], meta["image_size"])
    return scorer.eval().requires_grad_(False).to(device)


def evaluate_scorer(scorer: ClipScorer, eval_set: ImageStore, n: int) -> dict[str, float]:
    """Retrieval among the first n held-out pairs, computed from the exported files."""
    images, captions = _eval_pairs(eval_set, n)
    return retrieval(scorer.image_features(images, normalize=True), scorer.text_features(captions, normalize=True), captions)
