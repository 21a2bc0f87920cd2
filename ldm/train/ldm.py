"""Stage 3: train the text-conditioned U-Net on the latent cache; export a diffusers pipeline.

From scratch: a U-Net preset (tiny, small, sd15, sd2) sized for the cache's latents and the
text encoder. Fine-tuning: `model.pretrained` names a Stable Diffusion diffusers directory or
one of our pipeline directories, and whatever the config leaves unset (the VAE, the text
encoder and tokenizer, CLIP skip, the noise schedule's keys) is taken from there when the
config is loaded; the run prints what came from where.

Output (`<out_dir>/`): `pipeline/` (StableDiffusionPipeline.save_pretrained: vae, unet with the
EMA weights, text_encoder, tokenizer, scheduler with the training schedule, and `ldm.json`
recording how it was trained: the format is ldm.pipeline's), `samples/step-N.png` validation grids, `metrics.jsonl`,
`config.yaml` (resolved), `checkpoints/step-N/` for resume.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Iterator, Literal

import torch
from diffusers import StableDiffusionPipeline
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ldm.config import ConfigError, require, to_dict
from ldm.data.cache import LatentCache, open_cache, text_identity, vae_identity
from ldm.data.captions import CaptionConfig, process_caption
from ldm.data.labels import cache_labels, label_spec_problem, null_label, record_names
from ldm.data.split import upstream_split_problem
from ldm.data.images import image_grid
from ldm.data.transforms import BucketBatchSampler
from ldm.diffusion import (TrainNoiseConfig, fill_schedule, make_train_scheduler, noised_inputs, schedule_keys,
                           schedule_of, scheduler_config)
from ldm.fast import FastConfig, apply_fast_paths
from ldm.losses import diffusion_loss
from ldm.models.conditioning import TextEncoderConfig, load_text
from ldm.models.lora import LoRAConfig, add_lora, merge_lora, save_lora
from ldm.models.paths import is_single_file, model_path_problem
from ldm.models.text import encode_prompts, without_skipped_layers
from ldm.models.unet import UNetModelConfig, build_unet, downsampling
from ldm.models.vae import load_vae
from ldm.pipeline import RECORD, read_record, record_from_files, save_pipeline
from ldm.quality import (QualityEval, Stopwatch, check_run_history, check_spec, data_config_of_cache, default_features,
                         load_feature_network, real_images, summary_line)
from ldm.sampling import (DEFAULT_SAMPLERS, check_guidance_interval, decode_latents, denoise, initial_noise, make_scheduler,
                          seeded_generators)
from ldm.single_file import resolve_models
from ldm.train.common import (LoopConfig, NonFiniteGuard, lr_lambda, make_accelerator, make_optimizer,
                              register_schedule, resume, sample_generators, start_run, uniform)
from ldm.train.ema import make_ema, swapped_ema
from ldm.train.loop import run_loop

DEFAULT_VAE = "runs/vae/vae"  # stage 1's output under the default run directory


@dataclasses.dataclass
class ValidationConfig:
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a large red circle in the center, on a white background"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3])  # one image per prompt and seed
    steps: int = 25                 # sampling steps
    guidance_scale: float = 4.0
    guidance_interval: list[float] | None = None  # [lo, hi]: guide only the steps whose noise level (EDM sigma) is in
                                    # (lo, hi], the conditional prediction alone elsewhere (ldm.sampling.denoise);
                                    # None: every step. The export recommends these sampling settings (ldm.json)
    scheduler: str = ""             # "": dpm++2m, or flow-dpm++2m with noise.objective=flow
    held_out_batches: int = 4       # batches of held-out latents for the validation loss (fixed noise and t)
    quality_n: int = 200            # held-out images (their captions the prompts, fixed seeds) for FID, KID and
                                    # caption retrieval at each evaluation (ldm/quality.py); 0: off
    features: str = ""              # the network for those: "clip:<dir>" | "inception:<file>" | "": text.encoder
                                    # when train_clip.py made it (it has the image tower), else off
    bootstrap: int = 200            # resamples for the 95% intervals of each figure (0: no intervals)
    quality_steps: int = 0          # sampling steps of those images (0: `steps`); fewer keep the evaluation's
                                    # share of a CPU run small, and every evaluation of a run uses the same

    def validate(self) -> None:
        require(self.quality_steps >= 0, f"validation.quality_steps must be >= 0, got {self.quality_steps}")
        require(self.quality_n >= 0, f"validation.quality_n must be >= 0, got {self.quality_n}")
        require(self.bootstrap >= 0, f"validation.bootstrap must be >= 0, got {self.bootstrap}")
        try:
            check_guidance_interval(self.guidance_interval)
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from None  # validate() names the section
        check_spec("validation.features", self.features)


@dataclasses.dataclass
class LDMTextConfig(TextEncoderConfig):
    encoder: str = ""              # "": model.pretrained's text encoder and tokenizer, else the "tiny" preset
    clip_skip: int | None = None   # None: the layer model.pretrained was trained with (our ldm.json), else 0


@dataclasses.dataclass
class LDMTrainConfig:
    out_dir: str = "runs/ldm"          # run directory; the pipeline lands in <out_dir>/pipeline
    resume: str = "latest"             # "latest" (re-running the same command resumes), "" or a checkpoint path
    cache: str = "runs/latents"        # latent cache (stage 2 output)
    vae: str = ""                      # the VAE the cache was encoded with (checked by weight hash), exported with the
                                       # pipeline; "": model.pretrained's, else runs/vae/vae
    model: UNetModelConfig = dataclasses.field(default_factory=UNetModelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # rank > 0: train adapters of model.pretrained only
    text: LDMTextConfig = dataclasses.field(default_factory=LDMTextConfig)
    noise: TrainNoiseConfig = dataclasses.field(default_factory=TrainNoiseConfig)  # unset keys: model.pretrained's scheduler
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    caption_dropout: float = 0.1       # probability of training on the empty prompt (classifier-free guidance);
                                       # 1.0: always, a model unconditional on text
    labels: str = ""                   # class-conditional U-Net (ldm.data.labels): "" none, shapes:<attribute> or
                                       # folder; one class embedding per class plus a null one (label_dropout)
    label_dropout: float = 0.1         # probability of training on the null class (classifier-free guidance over classes)
    latent_sample: Literal["sample", "mode"] = "sample"  # draw z ~ q(z|x) each time, or use its mean
    fast: FastConfig = dataclasses.field(default_factory=FastConfig)  # GPU fast paths (ldm/fast.py): channels_last, torch.compile, TF32
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    use_8bit_adam: bool = False        # bitsandbytes' AdamW8bit (optimizer state in 8 bits); needs bitsandbytes
    sample_scheduler: str = ""         # the scheduler saved as the pipeline's default; "": dpm++2m, or flow-dpm++2m
                                       # with noise.objective=flow (flow-euler/heun/lcm: not in StableDiffusionPipeline)

    def __post_init__(self) -> None:
        fill_unset(self)

    def validate(self) -> None:
        require(0.0 <= self.caption_dropout <= 1.0, f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        require(0.0 <= self.label_dropout < 1.0, f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.labels:
            problem = label_spec_problem(self.labels)
            require(problem is None, f"labels: {problem}")
            require(not self.model.pretrained, "labels: a class-conditional U-Net is trained from scratch here "
                    "(model.pretrained has no class embedding); unset model.pretrained or labels")
        require(not self.lora.rank or bool(self.model.pretrained),
                "lora.rank needs model.pretrained: LoRA adapts a trained U-Net (set lora.rank=0 to train from scratch)")
        require(Path(self.cache).is_dir(), f"cache: no latent cache directory {self.cache!r} (run the encode stage first)")
        problem = model_path_problem(self.vae)
        require(problem is None, f"vae: {problem}")
        require(not self.fast.fuse_qkv, "fast.fuse_qkv is for sampling only: training would update fused copies that exports never see")
        if self.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError("use_8bit_adam needs bitsandbytes (pip install bitsandbytes); "
                                  "or set use_8bit_adam=false") from None
        for key, name in (("validation.scheduler", self.validation.scheduler), ("sample_scheduler", self.sample_scheduler)):
            try:
                make_scheduler(name, scheduler_config(self.noise))
            except (ValueError, ImportError) as err:
                raise ConfigError(f"{key}: {err}") from None


@dataclasses.dataclass
class FinetuneSource:
    """What a directory (or single file) to fine-tune from offers besides its U-Net (None where it
    has nothing).

    A Stable Diffusion diffusers directory, or single file, has a VAE (`vae/`), a text encoder and tokenizer
    (`text_encoder/`, `tokenizer/`) and the scheduler it was trained with (`scheduler/`); our own
    pipeline directory has these too, plus its record (ldm.pipeline) with the exact training
    schedule and the CLIP layer used. A bare U-Net directory has none of it.
    """

    path: str
    vae: str | None = None           # the path load_vae reads the pipeline's VAE from
    text_encoder: str | None = None  # the path load_text_encoder reads the text encoder and tokenizer from
    scheduler: dict | None = None    # the training scheduler's config
    scheduler_file: str = ""         # where that config was read (named in messages)
    clip_skip: int | None = None


def finetune_source(path: str | Path) -> FinetuneSource:
    """What `path` offers; each component is named by `path` itself, as the user gave it."""
    if is_single_file(path):
        return _single_file_source(path)
    root = Path(path)
    record = read_record(root)
    scheduler, scheduler_file = record.get("training_scheduler"), root / RECORD
    if scheduler is None and (root / "scheduler" / "scheduler_config.json").is_file():
        scheduler, scheduler_file = json.loads((root / "scheduler" / "scheduler_config.json").read_text()), root / "scheduler"
    return FinetuneSource(
        path=str(path),
        vae=str(path) if (root / "vae" / "config.json").is_file() else None,
        text_encoder=str(path) if (root / "text_encoder" / "config.json").is_file() else None,
        scheduler=scheduler,
        scheduler_file=str(scheduler_file),
        clip_skip=record.get("clip_skip"),
    )


def _single_file_source(path: str | Path) -> FinetuneSource:
    """What a single file offers, from its header: loading a config (and `--dry-run`) must not
    import a multi-GB checkpoint; training imports it when it first reads a model. Such a file
    always holds a VAE and a text encoder."""
    from ldm.export import single_file_configs

    configs, files = single_file_configs(path)
    record = record_from_files(files, path)
    return FinetuneSource(path=str(path), vae=str(path), text_encoder=str(path),
                          scheduler=record.get("training_scheduler") or configs["scheduler"],
                          scheduler_file=str(path), clip_skip=record.get("clip_skip"))


def fill_unset(cfg: LDMTrainConfig) -> None:
    """Fill the keys left unset: from model.pretrained where it has them, else the stage's defaults.

    important: this happens when the config is built, so `--dry-run`, the saved config.yaml and
    the run itself all show the values used, and re-running from config.yaml changes nothing.
    """
    pretrained = cfg.model.pretrained
    source = finetune_source(pretrained) if pretrained and model_path_problem(pretrained) is None else FinetuneSource("")
    cfg.vae = cfg.vae or source.vae or DEFAULT_VAE
    if not cfg.text.openclip_checkpoint:  # else that is the text encoder, and config.yaml says so alone
        cfg.text.encoder = cfg.text.encoder or source.text_encoder or "tiny"
    if cfg.text.clip_skip is None:
        cfg.text.clip_skip = source.clip_skip or 0
    fill_schedule(cfg.noise, schedule_of(source.scheduler, source.scheduler_file) if source.scheduler else None)
    cfg.sample_scheduler = cfg.sample_scheduler or DEFAULT_SAMPLERS[cfg.noise.objective]
    cfg.validation.scheduler = cfg.validation.scheduler or DEFAULT_SAMPLERS[cfg.noise.objective]


def finetune_report(cfg: LDMTrainConfig) -> list[str]:
    """What a fine-tune takes from model.pretrained, and where the config departs from it."""
    source = finetune_source(cfg.model.pretrained)
    lines = [f"fine-tuning the U-Net of {source.path}"]
    for what, sub, used, offered in (("vae", "vae", cfg.vae, source.vae),
                                     ("text encoder", "text_encoder", cfg.text.openclip_checkpoint or cfg.text.encoder,
                                      source.text_encoder)):
        if offered is None:
            lines.append(f"  {what}: {used} (model.pretrained has none)")
        elif _component_dir(used, sub) == _component_dir(offered, sub):
            lines.append(f"  {what}: model.pretrained's")
        else:
            lines.append(f"  {what}: {used}, set in the config instead of model.pretrained's: the U-Net was trained with that one")
    theirs = schedule_of(source.scheduler, source.scheduler_file) if source.scheduler else {}
    keys = ["objective", *schedule_keys(cfg.noise.objective)]
    same = [f"{k}={getattr(cfg.noise, k)}" for k in keys if theirs.get(k) == getattr(cfg.noise, k)]
    other = [f"{k}={getattr(cfg.noise, k)} (set in the config; {theirs[k]} there)" for k in keys
             if k in theirs and theirs[k] != getattr(cfg.noise, k)]
    lines.append(f"  noise schedule from {source.scheduler_file}: {', '.join(same) or 'nothing'}")
    lines += [f"  noise schedule: {o}" for o in other]
    return lines


def _component_dir(path: str, name: str) -> Path:
    """Where a pipeline directory keeps `name` (vae, text_encoder); any other directory is itself."""
    root = Path(path).resolve()
    return root / name if (root / name).is_dir() else root


def check_clip_split(text_encoder: str, manifest: dict) -> None:
    """A CLIP trained by train_clip on the cache's source must have held out every image the cache
    holds out: its text tower conditions this stage, and its scores judge what this stage makes."""
    if text_encoder and Path(text_encoder).is_dir():
        problem = upstream_split_problem(text_encoder, manifest.get("source"), manifest.get("split") or {},
                                         "the latent cache")
        if problem:
            raise ConfigError(problem)


def train_ldm(cfg: LDMTrainConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    loop = cfg.train
    accelerator = make_accelerator(loop, out_dir)
    # a single file given for a model is read from its imported directory (cfg keeps the file's path)
    models = resolve_models(cfg, "vae", "model.pretrained", "text.encoder")
    # --- data: the latent cache must come from this VAE, weights and latent scale (checked before
    # the run directory is made), so the one scale scales training latents and decodes samples;
    # each batch holds one latent size
    vae = load_vae(models.vae)
    identity = vae_identity(vae)
    cache = open_cache(cfg.cache, "train", expect=identity)
    held_out = open_cache(cfg.cache, "eval", expect=identity)
    check_clip_split(cfg.text.encoder, held_out.manifest)
    classes, labels, held_labels = None, None, None
    if cfg.labels:  # class-conditional: one label per record (ldm.data.labels), one numbering for both splits
        classes, labels = cache_labels(cache, cfg.labels)
        held_labels = cache_labels(held_out, cfg.labels, classes)[1]
    latent_hw = most_common_size(cache)

    log = start_run(accelerator, cfg, out_dir, "ldm")
    if cfg.model.pretrained:
        accelerator.print("\n".join(finetune_report(cfg)))
    torch.manual_seed(loop.seed)
    device = accelerator.device

    # --- models: frozen text encoder, U-Net (fresh or fine-tuned), EMA
    text_encoder, tokenizer = load_text(models.text)
    text_encoder.to(device)
    unet = build_unet(models.model, cache.manifest["latent_channels"], sample_size(latent_hw), text_encoder.config.hidden_size,
                      num_class_embeds=len(classes) + 1 if classes else None)  # + the null class
    check_latent_sizes(unet, cache)
    trainable = add_lora(unet, cfg.lora) if cfg.lora.rank else list(unet.parameters())  # what the optimiser and EMA see
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    apply_fast_paths(unet, cfg.fast, device)  # before the optimiser and accelerate see it
    noise_scheduler = make_train_scheduler(cfg.noise)
    optimizer = make_optimizer(trainable, loop, use_8bit=cfg.use_8bit_adam)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(loop))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    register_schedule(accelerator, lr_sched)
    ema = make_ema(trainable, loop, device)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    empty = encode_prompts(text_encoder, tokenizer, [""], clip_skip=cfg.text.clip_skip)
    use_cached_text = cache.text_matches(text_identity(text_encoder, tokenizer, cfg.text.clip_skip))
    validate = Validator(cfg, vae, text_encoder, tokenizer, held_out, latent_hw, out_dir, log, classes, held_labels)

    # --- resume: the step fixes the data position and every random draw after it
    step, guard = resume(accelerator, out_dir, cfg.resume, loop.max_nonfinite_steps)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = size_batches(cache.size_groups(), loop.batch_size, loop.seed, step * loop.grad_accum, rank, world)
    unet_step = UNetStep(cfg=cfg, accelerator=accelerator, cache=cache, unet=unet, trainable=trainable, optimizer=optimizer,
                         noise_scheduler=noise_scheduler, text_encoder=text_encoder, tokenizer=tokenizer, empty=empty,
                         use_cached_text=use_cached_text, guard=guard, ema=ema, labels=labels,
                         classes=classes)
    unet.train()  # important: from_pretrained returns a model in eval mode, which would switch LoRA dropout off

    # --- the loop (ldm.train.loop.run_loop): each step, each evaluation (EMA weights), the export
    def train_step(step: int) -> dict:
        loss = unet_step(step, batches)
        lr = lr_sched.get_last_lr()[0]  # the rate this step used
        lr_sched.step()  # important: once per optimiser step, not per micro-batch, or warm-up ends grad_accum x early
        norm = {} if unet_step.grad_norm is None else {"grad_norm": unet_step.grad_norm}
        return {"loss": loss, "lr": lr, **norm}

    def evaluate(step: int) -> None:
        with swapped_ema(ema, trainable):
            validate(accelerator.unwrap_model(unet), noise_scheduler, step)

    def export(step: int) -> None:
        """The EMA weights, in a directory diffusers loads as it is (LoRA: merged into the U-Net,
        and the adapters alone in lora/ for load_lora_weights on the original model)."""
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trainable)
        final.eval()
        validate(final, noise_scheduler, step)
        if cfg.lora.rank:
            save_lora(final, out_dir / "lora", name=out_dir.resolve().name)
            final = merge_lora(final)
        export_pipeline(cfg, final, vae, text_encoder, tokenizer, latent_hw, out_dir / "pipeline",
                        split=held_out.manifest.get("split"), classes=classes)

    run_loop(accelerator, loop, out_dir, log, guard, step, "unet", train_step, evaluate, export)
    return out_dir / "pipeline"


# ----------------------------------------------------------------------------- batches


def size_batches(groups: dict[str, list[int]], batch_size: int, seed: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1) -> Iterator[list[int]]:
    """Endless stream of this process's index batches, from global batch number `start_batch` on.

    Every global batch (batch_size x world items) comes from one latent size, the groups of a
    bucketed cache, and is split across processes, so all of them train on one size at a time.
    An epoch's order is BucketBatchSampler's, a pure function of (seed, epoch): a resumed run
    sees the same batches. A size's last incomplete batch is left out of that epoch.
    """
    bucket_of = {item: b for b, key in enumerate(sorted(groups)) for item in groups[key]}
    sampler = BucketBatchSampler([bucket_of[i] for i in range(len(bucket_of))], batch_size * world, seed=seed, drop_last=True)
    if len(sampler) == 0:
        raise ValueError(f"no latent size has a full global batch of {batch_size * world} items "
                         f"(sizes: { {k: len(v) for k, v in groups.items()} }); lower train.batch_size")
    epoch, offset = divmod(start_batch, len(sampler))
    while True:
        sampler.set_epoch(epoch)
        for batch in list(sampler)[offset:]:
            yield batch[rank * batch_size : (rank + 1) * batch_size]
        epoch, offset = epoch + 1, 0


def random_flips(cache: LatentCache, gen: list[torch.Generator]) -> torch.Tensor | None:
    """Mirror each image with probability 1/2, where the cache holds both mirror images' posteriors."""
    if not cache.manifest["transform"].get("flip"):
        return None
    return uniform(gen) < 0.5


def most_common_size(cache: LatentCache) -> tuple[int, int]:
    """(h, w) of the latent size with the most images (ties: the larger): the U-Net's sample_size."""
    counts = {tuple(map(int, key.split("x"))): len(items) for key, items in cache.size_groups().items()}
    return max(counts, key=lambda hw: (counts[hw], hw[0] * hw[1]))


def sample_size(hw: tuple[int, int]) -> int | tuple[int, int]:
    """diffusers' sample_size: an int for a square, else (h, w)."""
    return hw[0] if hw[0] == hw[1] else hw


def check_latent_sizes(unet, cache: LatentCache) -> None:
    factor = downsampling(unet)
    bad = [key for key in cache.size_groups() if any(int(s) % factor for s in key.split("x"))]
    if bad:
        raise ValueError(f"latent sizes {bad} are not divisible by {factor}, the U-Net's downsampling; "
                         f"encode with bucket_step a multiple of {factor} x the VAE's factor")


def training_inputs(cfg: LDMTrainConfig, cache: LatentCache, indices: list[int], gen, noise_scheduler, device,
                    text_encoder, tokenizer, empty: torch.Tensor, use_cached_text: bool):
    """One micro-batch's U-Net inputs: (noisy latents, timesteps, text conditioning, target, loss weights).

    A fresh posterior sample of each image (mirrored where the cache holds flips), its caption's
    embedding with classifier-free dropout, and the forward process at random timesteps; every
    draw comes from the samples' own generators `gen`.
    """
    flip = random_flips(cache, gen)
    latents = cache.latents(indices, generator=gen, mode=cfg.latent_sample == "mode", flip=flip).to(device)
    cond = conditioning(cfg, cache, indices, text_encoder, tokenizer, empty, gen, use_cached_text)
    noisy, t, target, weights = noised_inputs(noise_scheduler, cfg.noise, latents, gen)
    return noisy, t, cond, target, weights


def conditioning(cfg: LDMTrainConfig, cache: LatentCache, indices: list[int], text_encoder, tokenizer,
                 empty: torch.Tensor, gen: list[torch.Generator], use_cached_text: bool = False) -> torch.Tensor:
    """Text embeddings for a batch, with classifier-free caption dropout (Ho & Salimans 2022).

    important: caption dropout happens here, not in the dataset, so it works the same with
    cached text embeddings; a dropped caption gets the embedding of the empty prompt, which is
    exactly the unconditional input the sampler uses for guidance.
    """
    rngs = [random.Random(int(torch.randint(0, 2**31, (1,), generator=g))) for g in gen]  # one per sample
    prompts = [process_caption(cache.captions[i], cfg.captions, rng) for i, rng in zip(indices, rngs)]
    cond = cache.text_embeddings(prompts) if use_cached_text else None  # None when a prompt was altered
    if cond is None:
        with torch.no_grad():
            cond = encode_prompts(text_encoder, tokenizer, prompts, clip_skip=cfg.text.clip_skip)
    cond = cond.to(device=empty.device, dtype=empty.dtype)
    drop = uniform(gen) < cfg.caption_dropout
    return torch.where(drop[:, None, None].to(cond.device), empty.expand_as(cond), cond)


def class_labels(labels: torch.Tensor, null: int, dropout: float, gen: list[torch.Generator]) -> torch.Tensor:
    """A batch's class labels with label dropout: a dropped label becomes the null class (the last
    class embedding), the unconditional input of classifier-free guidance over classes. The null
    class's index is the number of classes: the U-Net has num_class_embeds = classes + 1."""
    return torch.where(uniform(gen) < dropout, torch.full_like(labels, null), labels)


@dataclasses.dataclass(kw_only=True)
class UNetStep:
    """One optimiser step of stage 3: `grad_accum` micro-batches of the U-Net's loss, then the EMA.
    The trainer's step, and the one bench/bench_train.py times. The fields stay fixed over a run, but
    `grad_norm`: the last optimiser step's gradient norm before clipping (train.max_grad_norm)."""

    cfg: LDMTrainConfig
    accelerator: Accelerator
    cache: LatentCache
    unet: torch.nn.Module               # as accelerate prepared it
    trainable: list[torch.nn.Parameter]  # what the optimiser and the EMA see (LoRA: the adapters)
    optimizer: torch.optim.Optimizer
    noise_scheduler: object             # the training schedule (ldm.diffusion.make_train_scheduler)
    text_encoder: torch.nn.Module
    tokenizer: object
    empty: torch.Tensor                 # the empty prompt's embedding: a dropped caption's conditioning
    use_cached_text: bool               # the cache holds this text encoder's embeddings
    guard: NonFiniteGuard
    ema: EMAModel | None = None
    labels: torch.Tensor | None = None  # class-conditional: the label of every cache record (ldm.data.labels)
    classes: list[str] | None = None    # their names; the null class is len(classes)
    grad_norm: torch.Tensor | None = None

    def __call__(self, step: int, batches: Iterator[list[int]]) -> torch.Tensor:
        """Take optimiser step `step` on the next micro-batches of `batches`; the mean loss (0-d tensor)."""
        loop, rank = self.cfg.train, self.accelerator.process_index
        losses = []
        for micro in range(loop.grad_accum):
            indices = next(batches)
            # every random draw of a sample: the same on 1 or N processes (see sample_generators)
            gen = sample_generators(loop.seed, step, micro, rank * len(indices), len(indices))
            losses.append(self.micro_batch(indices, gen))
        if self.ema is not None:
            self.ema.step(self.trainable)
        return torch.stack(losses).float().mean()

    def micro_batch(self, indices: list[int], gen: list[torch.Generator]) -> torch.Tensor:
        accelerator, loop = self.accelerator, self.cfg.train
        noisy, t, cond, target, weights = training_inputs(
            self.cfg, self.cache, indices, gen, self.noise_scheduler, accelerator.device,
            self.text_encoder, self.tokenizer, self.empty, self.use_cached_text)
        extra = {}
        if self.labels is not None:
            labels = class_labels(self.labels[indices], null_label(self.classes), self.cfg.label_dropout, gen)
            extra["class_labels"] = labels.to(accelerator.device)
        with accelerator.accumulate(self.unet):
            pred = self.unet(noisy, t, encoder_hidden_states=cond, **extra, return_dict=False)[0]
            loss = diffusion_loss(pred, target, weights)
            if self.guard.ok(loss):
                accelerator.backward(loss)  # divided by grad_accum by accelerate
                if accelerator.sync_gradients and loop.max_grad_norm:
                    self.grad_norm = accelerator.clip_grad_norm_(self.trainable, loop.max_grad_norm)
                self.optimizer.step()  # a no-op until the last micro-batch of the step
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# ----------------------------------------------------------------------------- validation and export


class Validator:
    """Held-out loss, a sample grid and the quality figures, with what stays fixed across a run set up once.

    The loss uses fixed noise and timesteps (and the training loss weights), so its values
    compare across steps and runs; the grid has one row per prompt, one column per seed. With
    validation.quality_n, N images generated from held-out captions (image i from seed i) are
    measured against the real held-out images (`ldm.quality.QualityEval`); the figures go to
    metrics.jsonl as quality/*, the last ones to eval.json, and each evaluation's cost to eval/*.
    """

    def __init__(self, cfg: LDMTrainConfig, vae, text_encoder, tokenizer, held_out: LatentCache,
                 latent_hw: tuple[int, int], out_dir: Path, log, classes: list[str] | None = None,
                 held_labels: torch.Tensor | None = None):
        self.cfg, self.vae, self.text_encoder, self.tokenizer = cfg, vae, text_encoder, tokenizer
        self.classes, self.held_labels = classes, held_labels  # class-conditional U-Nets
        self.held_out, self.latent_hw, self.out_dir, self.log = held_out, latent_hw, out_dir, log
        bs, limit = cfg.train.batch_size, cfg.validation.held_out_batches
        self.batches = [items[s : s + bs] for items in held_out.size_groups().values() for s in range(0, len(items), bs)][:limit]
        self.watch, self.quality, self.network = Stopwatch(), None, None
        self.setup_quality()

    def setup_quality(self) -> None:
        """Choose the feature network and N, and refuse a resumed run measured with others."""
        val = self.cfg.validation
        if not val.quality_n:
            return
        spec, why = (val.features, "") if val.features else default_features(self.cfg.text.encoder)
        if not spec:
            print(f"quality evaluation off: {why}")
            return
        if len(self.held_out) < 2:  # important: off, not an error at the end of training that loses the export
            print(f"quality evaluation off: FID and KID need at least 2 held-out images, the cache holds {len(self.held_out)}")
            return
        self.network = load_feature_network(spec)
        self.n = min(val.quality_n, len(self.held_out))
        if self.n < val.quality_n:
            print(f"quality evaluation: validation.quality_n={val.quality_n}, but the cache holds {len(self.held_out)} "
                  f"held-out images: n={self.n}")
        check_run_history(self.out_dir / "metrics.jsonl", self.network.identity, self.n)

    @torch.no_grad()
    def __call__(self, unet, noise_scheduler, step: int) -> None:
        # every module's own mode: the top module's flag alone can differ from its submodules' (LoRA
        # layers added to a U-Net loaded in eval mode), and restoring it would switch them all
        modes = {module: module.training for module in unet.modules()}
        unet.eval()
        val, clip_skip = self.cfg.validation, self.cfg.text.clip_skip
        device = next(unet.parameters()).device
        with self.watch:
            gen = torch.Generator().manual_seed(1234)
            losses = []
            for indices in self.batches:
                latents = self.held_out.latents(indices, generator=gen).to(device)
                prompts = [self.held_out.captions[i][0] for i in indices]
                if self.cfg.caption_dropout == 1.0:  # a text-unconditional model: the prompt it was trained on
                    prompts = [""] * len(prompts)
                cond = encode_prompts(self.text_encoder, self.tokenizer, prompts, clip_skip=clip_skip)
                noisy, t, target, weights = noised_inputs(noise_scheduler, self.cfg.noise, latents, gen)
                extra = {} if self.classes is None else {"class_labels": self.held_labels[indices].to(device)}
                pred = unet(noisy, t, encoder_hidden_states=cond, **extra, return_dict=False)[0]
                losses.append(diffusion_loss(pred, target, weights).item())
            if val.prompts and val.seeds:
                images = self.grid(unet, device)
                (self.out_dir / "samples").mkdir(exist_ok=True)
                image_grid(images * 2 - 1, nrow=len(val.seeds)).save(self.out_dir / "samples" / f"step-{step:06d}.png")
            figures = self.measure_quality(unet, device) if self.network is not None else {}
        values = {"val_loss": sum(losses) / len(losses)} if losses else {}
        values.update({f"quality/{k}": v for k, v in figures.items()})
        run_seconds = time.time() - self.log.t0
        # the cost of evaluating against the whole run so far (this session's, when resumed)
        values.update({"eval/seconds": self.watch.last, "eval/fraction": self.watch.seconds / max(run_seconds, 1e-9)})
        self.log.write(step, **values)
        if figures:
            print(f"step {step} quality: {summary_line(figures)} ({self.watch.last:.1f} s)")
        summary = {"step": step, **{k: v for k, v in values.items() if not k.startswith("quality/")},
                   "eval/total_seconds": self.watch.seconds, "run_seconds": run_seconds}
        if figures:  # with the record of which held-out images they come from (ldm.data.split)
            summary.update(features=figures["features"], n=figures["n"], quality=figures,
                           split=self.held_out.manifest.get("split"))
        (self.out_dir / "eval.json").write_text(json.dumps(summary, indent=2))
        for module, training in modes.items():
            module.training = training

    def measure_quality(self, unet, device) -> dict:
        """Generate one image per held-out caption and measure them (the real images and the
        fixed figures are read and computed at the first call, on the main process only)."""
        if self.quality is None:
            self.network.image.to(device)  # (a CLIP's text tower moves with its image tower: one module)
            held_out, captions, reference = real_images(data_config_of_cache(self.held_out.manifest), self.n)
            self.quality = QualityEval(self.network, held_out, captions, reference, resamples=self.cfg.validation.bootstrap)
        quality = self.quality
        images = self.sample(unet, device, quality.prompts, quality.seeds, self.cfg.train.batch_size,
                             steps=self.cfg.validation.quality_steps or self.cfg.validation.steps)
        return quality(images * 2 - 1)

    def grid(self, unet, device) -> torch.Tensor:
        """Images in [0, 1] for every (prompt, seed), sampled with the training schedule."""
        val = self.cfg.validation
        return self.sample(unet, device, [p for p in val.prompts for _ in val.seeds],
                           [s for _ in val.prompts for s in val.seeds])

    def sample(self, unet, device, prompts: list[str], seeds: list[int], batch_size: int | None = None,
               steps: int | None = None) -> torch.Tensor:
        """Images in [0, 1], image i from prompts[i] and seeds[i], `batch_size` at a time, in `steps`
        sampling steps (default: validation.steps)."""
        val, clip_skip = self.cfg.validation, self.cfg.text.clip_skip
        batch_size = batch_size or len(prompts)
        empty = encode_prompts(self.text_encoder, self.tokenizer, [""], clip_skip=clip_skip)  # once, not per batch
        out = []
        for start in range(0, len(prompts), batch_size):
            batch, batch_seeds = prompts[start : start + batch_size], seeds[start : start + batch_size]
            scheduler = make_scheduler(val.scheduler, scheduler_config(self.cfg.noise))
            generators = seeded_generators(batch_seeds)
            cond = encode_prompts(self.text_encoder, self.tokenizer, batch, clip_skip=clip_skip)
            uncond = empty.expand(len(batch), -1, -1)
            noise = initial_noise((len(batch), unet.config.in_channels, *self.latent_hw), generators, device, cond.dtype)
            latents = denoise(unet, scheduler, cond, uncond, noise, num_steps=steps or val.steps,
                              guidance_scale=val.guidance_scale, guidance_interval=val.guidance_interval,
                              generator=generators, **self.prompt_labels(batch, device))
            out.append(decode_latents(self.vae.to(device), latents).cpu())
        return torch.cat(out)


    def prompt_labels(self, prompts: list[str], device) -> dict:
        """A class-conditional U-Net's labels for validation prompts: the class each prompt names
        (shapes:<attribute>), else the null class; none for other U-Nets."""
        if self.classes is None:
            return {}
        null = null_label(self.classes)
        wanted = []
        for prompt in prompts:
            try:
                wanted.append(self.classes.index(record_names(self.cfg.labels, [[prompt]], [""])[0]))
            except ValueError:  # folder labels, or a prompt that names no class
                wanted.append(null)
        return {"class_labels": torch.tensor(wanted, device=device),
                "uncond_class_labels": torch.full((len(prompts),), null, device=device)}


def recommended_sampling(val: ValidationConfig) -> dict:
    """What the export recommends (ldm.json "sampling"): the validation's steps and guidance, which its figures used."""
    out = {"steps": val.steps, "guidance_scale": val.guidance_scale}
    if val.guidance_interval is not None:
        out["guidance_interval"] = list(val.guidance_interval)
    return out


def export_pipeline(cfg: LDMTrainConfig, unet, vae, text_encoder, tokenizer, latent_hw: tuple[int, int], path: Path,
                    split: dict | None = None, classes: list[str] | None = None) -> None:
    """A StableDiffusionPipeline directory that diffusers loads as it is, plus its record ldm.json
    (format: ldm.pipeline, which writes it).

    The scheduler saved is `sample_scheduler` configured with the training schedule (prediction
    type, betas, zero-terminal-SNR rescaling, timestep spacing; flow: the shift), so `from_pretrained`
    samples the model as it was trained; ldm.json keeps the rest of the recipe, the objective first,
    and `split` (the cache's held-out set, ldm.data.split) says which images the held-out loss came from.
    StableDiffusionPipeline itself runs the flow samplers on flow sigmas (flow-dpm++2m, flow-unipc), not
    the FlowMatch* ones (flow-euler, flow-heun, flow-lcm), which lack init_noise_sigma and scale_model_input.
    """
    scheduler = make_scheduler(cfg.sample_scheduler, scheduler_config(cfg.noise))
    # clip_skip k is folded into the export (the text encoder's last k layers dropped), so that the
    # pipeline's plain output is what the U-Net learned from, in diffusers and every tool without a
    # clip_skip argument; ldm.json then says 0, and `clip_skip_folded` what was dropped
    text_encoder = without_skipped_layers(text_encoder, cfg.text.clip_skip)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    record = {
        "objective": cfg.noise.objective,                    # diffusion or flow: which samplers fit (ldm.sampling)
        "caption_dropout": cfg.caption_dropout,
        "noise": to_dict(cfg.noise),
        "clip_skip": 0,
        "clip_skip_folded": cfg.text.clip_skip,
        "training_scheduler": scheduler_config(cfg.noise),
        "latent_size": list(latent_hw),                      # (h, w) of the most common training size
        "image_size": [s * factor for s in latent_hw],       # px
        "fine_tuned_from": cfg.model.pretrained or None,
        "lora": to_dict(cfg.lora) if cfg.lora.rank else None,  # merged into unet/; the adapters alone in ../lora/
        "ema_decay": cfg.train.ema_decay,
        "validation": to_dict(cfg.validation),
        "sampling": recommended_sampling(cfg.validation),    # infer.py's, app.py's and ldm.evaluate's defaults
        "split": split,                                      # the held-out latents of val_loss (cache manifest)
        "labels": cfg.labels or None,                        # class-conditional (ldm.data.labels): how labels were read
        "classes": classes,                                  # class names by label; the null class is len(classes)
        "label_dropout": cfg.label_dropout if classes else None,
        "train_config": to_dict(cfg),
    }
    save_pipeline(pipe, path, record)
