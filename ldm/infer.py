"""Inference: load a Stable Diffusion-style pipeline and generate images (the API behind infer.py).

    pipe = ldm.load_pipeline("runs/demo/ldm")      # run dir, pipeline dir, SD diffusers dir or .safetensors
    results = ldm.generate(pipe, ["a large red circle on the left"], seeds=[0], scheduler="dpm++2m")
    results[0]["image"].save("circle.png")

`generate` does text-to-image, img2img (`init_image`, `strength`) and inpainting (`init_image`,
`mask_image`); for the same seeds it gives the images diffusers' StableDiffusionPipeline,
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline give with one CPU generator per
image (see `ldm.sampling`). Two deliberate differences, both in inpainting: diffusers draws the
init image's posterior sample for every image of a batch from the first generator (here each image
uses its own, so an image depends only on its seed), and with a 4-channel UNet it also encodes the
masked image, which it never uses, advancing the generator; so inpainting matches diffusers for one
image at a time, and with a 4-channel UNet only for schedulers that draw no noise while stepping
(not ddpm, euler_a, kdpm2_a, dpm++2m_sde, or ddim with eta > 0).

Each saved PNG carries its prompt, seed, scheduler, steps and guidance in PNG text chunks, so an
image says how to make it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from ldm.data.cache import vae_identity
from ldm.data.labels import label_indices, null_label
from ldm.diffusion import objective_of
from ldm.fast import FastConfig, apply_to_pipeline
from ldm.models.text import encode_prompts
from ldm.models.vae import downsample_factor
from ldm.pipeline import INDEX, load_pipeline_dir, read_record, record_from_files
from ldm.safetensors_io import open_safetensors
from ldm.sampling import (DEFAULT_SAMPLERS, SCHEDULERS, ClassifierGuidance, Inpainting, check_guidance_interval,
                          decode_latents, denoise, encode_images, initial_noise, make_scheduler, scheduler_name_of,
                          seed_sde_noise, seeded_generators)

DEFAULT_SCHEDULER = "dpm++2m"  # for a pipeline whose saved scheduler has no name in SCHEDULERS
DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5  # for a pipeline whose ldm.json recommends none


@dataclasses.dataclass
class Pipeline:
    """The components a sampler needs; `base_scheduler_config` is the model's training schedule."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    base_scheduler_config: dict
    default_scheduler: str = DEFAULT_SCHEDULER
    clip_skip: int = 0
    path: str = ""
    classes: list[str] | None = None  # a class-conditional U-Net's class names by label (ldm.json); None: none
    sampling: dict = dataclasses.field(default_factory=dict)  # ldm.json's recommended "steps" and "guidance_scale"
                                                               # (a distilled model's: few steps, its distilled scale)
    consistency: dict | None = None  # ldm.json's record of a consistency-distilled model (distill.py), else None

    @property
    def default_steps(self) -> int:
        return int(self.sampling.get("steps", DEFAULT_STEPS))

    @property
    def default_guidance(self) -> float:
        return float(self.sampling.get("guidance_scale", DEFAULT_GUIDANCE))

    @property
    def default_guidance_interval(self) -> tuple[float, float] | None:
        interval = self.sampling.get("guidance_interval")
        return tuple(float(v) for v in interval) if interval is not None else None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_factor(self) -> int:
        return downsample_factor(self.vae)

    @property
    def native_height_width(self) -> tuple[int, int]:
        """(height, width) in pixels the UNet was built for: 512 for SD-1.x and SD-2 base, 768 for
        SD-2.1-v. Bucketed training stores a non-square sample_size as a list [h, w]."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_factor, w * self.vae_factor

    @property
    def native_size(self) -> int:
        """The longer side of `native_height_width`, for callers that need one number."""
        return max(self.native_height_width)

    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel UNet (SD inpainting): latents + mask + masked image latents."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1


def auto_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def auto_dtype(device: str) -> torch.dtype:
    """Half precision on accelerators (bfloat16 where supported: no fp16 overflow), float32 on CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


def resolve_pipeline_dir(path: str | Path) -> Path:
    """A run dir (holding pipeline/) resolves to its pipeline; anything else is itself."""
    path = Path(path)
    return path / "pipeline" if (path / "pipeline" / INDEX).is_file() else path


def _ldm_record(path: Path) -> dict:
    """How the model was trained (ldm.pipeline's record) of a pipeline dir, or as our single files
    carry it; {} for anyone else's."""
    if path.is_dir():
        return read_record(path)
    if path.suffix == ".safetensors":
        from ldm.export import carried_files

        return record_from_files(carried_files(path), path)
    return {}


def _load_diffusers(path: Path, allow_pickle: bool):
    if path.is_file():
        from ldm.export import import_single_file

        return import_single_file(path, allow_pickle=allow_pickle)
    if (path / INDEX).is_file():
        return load_pipeline_dir(path, safety_checker=None, requires_safety_checker=False)
    raise FileNotFoundError(f"{path}: not a run dir, a diffusers pipeline dir ({INDEX}) or a checkpoint file")


def fuse_loras(sd, loras: Sequence[tuple[str | Path, float]]) -> None:
    """Fold each LoRA into the U-Net (and the text encoder, where it has layers for it) at its
    strength, then drop the adapter layers: sampling runs at full speed, and the fast paths see a
    plain model. Any format diffusers' `load_lora_weights` reads: ours (`<run>/lora`), diffusers',
    kohya's and the web UIs'. The weights are still float32 here, so the small updates survive."""
    for i, (where, strength) in enumerate(loras):
        where = Path(where)
        if not where.exists():
            raise FileNotFoundError(f"no LoRA file or directory at {where}")
        name = f"lora{i}"
        if where.suffix == ".safetensors":
            with open_safetensors(where):  # a corrupt file fails here, naming it, not deep in diffusers
                pass
        folder, weight_name = (where, None) if where.is_dir() else (where.parent, where.name)
        sd.load_lora_weights(folder, weight_name=weight_name, adapter_name=name)
        sd.fuse_lora(lora_scale=strength, adapter_names=[name])
        sd.unload_lora_weights()  # the fused weights stay


def parse_lora(text: str) -> tuple[str, float]:
    """PATH or PATH:STRENGTH (default 1)."""
    where, _, strength = text.rpartition(":")
    try:
        return where, float(strength)
    except ValueError:  # no ":", or one that is part of the path
        return text, 1.0


def _set_attention(sd, attention: str) -> None:
    """sdpa: diffusers' default processors (torch's scaled_dot_product_attention); xformers on request."""
    if attention == "xformers":
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise ImportError("attention='xformers' needs xformers (pip install xformers); the default 'sdpa' needs nothing")
        sd.enable_xformers_memory_efficient_attention()
    elif attention != "sdpa":
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {attention!r}")


def load_pipeline(path: str | Path, device: str | None = None, dtype: torch.dtype | str | None = None,
                  attention: str = "sdpa", allow_pickle: bool = False, fast: FastConfig | None = None,
                  loras: Sequence[tuple[str | Path, float]] = ()) -> Pipeline:
    """Our run dir or pipeline dir, any SD-1.x/2.x diffusers dir, or an original single-file checkpoint
    (.safetensors; a pickled .ckpt only with allow_pickle). Device and dtype default to the best available.

    `loras`: (LoRA file or directory, strength) pairs, folded into the weights before the cast to
    `dtype` (see `fuse_loras`)."""
    device = device or auto_device()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or auto_dtype(device))
    path = resolve_pipeline_dir(path)
    sd = _load_diffusers(path, allow_pickle)
    fuse_loras(sd, loras)
    _set_attention(sd, attention)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.to(device=device).eval()
        if module.dtype != dtype:  # (diffusers warns on every dtype argument to .to(), even a no-op one)
            module.to(dtype=dtype)
    record = _ldm_record(path)
    # the class tells a saved FlowMatch* scheduler (a flow model's) from a diffusion one
    base = dict(record.get("training_scheduler") or {"_class_name": type(sd.scheduler).__name__, **sd.scheduler.config})
    sampling = dict(record.get("sampling") or {})
    # ldm.json's recommended sampler first: a flow consistency student saves flow-ddim for diffusers' pipeline,
    # which cannot run FlowMatchLCMScheduler, and recommends flow-lcm
    default = sampling.get("scheduler") or scheduler_name_of(sd.scheduler) or DEFAULT_SAMPLERS[objective_of(base)]
    pipe = Pipeline(unet=sd.unet, vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                    base_scheduler_config=base, default_scheduler=default,
                    clip_skip=int(record.get("clip_skip", 0)), path=str(path), sampling=sampling,
                    consistency=record.get("consistency"), classes=record.get("classes"))
    return apply_to_pipeline(pipe, fast) if fast is not None else pipe


@dataclasses.dataclass
class _ImageInputs:
    """img2img / inpainting inputs at the output size, as diffusers' image processors make them."""

    image: torch.Tensor                 # (1, 3, H, W) in [0, 1]
    mask: torch.Tensor | None = None    # (1, 1, H, W), binarized: 1 = regenerate


def _image_inputs(pipe: Pipeline, init_image, mask_image, width: int | None, height: int | None) -> _ImageInputs:
    """Without width/height the image keeps its size (rounded down to the VAE factor), as in diffusers."""
    f = pipe.vae_factor
    # do_normalize=False: [0, 1]; encode_images maps to [-1, 1] with diffusers' arithmetic.
    image = VaeImageProcessor(vae_scale_factor=f, do_normalize=False).preprocess(load_image(init_image), height, width)
    if mask_image is None:
        return _ImageInputs(image)
    masks = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return _ImageInputs(image, masks.preprocess(load_image(mask_image), image.shape[2], image.shape[3]))


def _check_request(pipe: Pipeline, prompts, negative_prompts, seeds, width, height, strength, images) -> None:
    f = pipe.vae_factor
    if len(negative_prompts) != len(prompts) or len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(negative_prompts)} negative prompts and {len(seeds)} seeds: "
                         "give one of each per image")
    if width % f or height % f:
        raise ValueError(f"width and height must be multiples of the VAE factor {f}, got {width}x{height}")
    if images is None and strength != 1.0:
        raise ValueError(f"strength {strength} needs an init_image (img2img)")
    if pipe.inpainting_unet and (images is None or images.mask is None):
        raise ValueError(f"{pipe.path}: a 9-channel inpainting UNet needs init_image and mask_image")


_AND = re.compile(r"\s+AND\s+")
_WEIGHT = re.compile(r"(.*?)\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*", re.S)


def prompt_parts(prompt: str) -> list[tuple[str, float]]:
    """A composed prompt's parts and their weights, in the syntax of Liu et al. 2022 and AUTOMATIC1111:
    "a green square AND on a black background :0.8" is [("a green square", 1.0), ("on a black background", 0.8)].
    A prompt without " AND " is one part of weight 1, taken verbatim (a colon in it is only text)."""
    texts = _AND.split(prompt)
    if len(texts) == 1:
        return [(prompt, 1.0)]
    parts = []
    for text in texts:
        match = _WEIGHT.fullmatch(text)
        text, weight = (match[1], float(match[2])) if match else (text.strip(), 1.0)
        if not text:
            raise ValueError(f"an empty part in the composed prompt {prompt!r}")
        parts.append((text, weight))
    return parts


def encode_composed(pipe: Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(conditioning, part weights): for plain prompts the prompts' embeddings (B, ...) and None; if any prompt
    is composed ("... AND ..."), the K parts' embeddings, part k of every prompt in the k-th block (K * B, ...),
    and their weights (K, B); a prompt of fewer parts is padded with "" at weight 0 (`ldm.sampling.denoise`)."""
    parts = [prompt_parts(p) for p in prompts]
    if all(len(p) == 1 for p in parts):
        return encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, pipe.clip_skip, pipe.device), None
    k = max(len(p) for p in parts)
    padded = [p + [("", 0.0)] * (k - len(p)) for p in parts]
    texts = [padded[i][j][0] for j in range(k) for i in range(len(prompts))]
    weights = torch.tensor([[p[j][1] for p in padded] for j in range(k)])
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, texts, pipe.clip_skip, pipe.device), weights


def check_distilled_guidance(pipe: Pipeline, guidance_scale: float) -> None:
    """Warn where a consistency-distilled model is asked for a guidance it was not distilled for: with a
    guidance embedding, a scale outside the distilled range extrapolates; without one (an LCM-LoRA, one
    scale distilled in), a scale above 1 adds classifier-free guidance on top of the distilled one."""
    info = pipe.consistency
    if not info:
        return
    low, high = info["guidance"]["w_min"], info["guidance"]["w_max"]
    if info["guidance"]["embedding_dim"] and not low <= guidance_scale <= high:
        warnings.warn(f"{pipe.path}: distilled for guidance scales {low}-{high}; {guidance_scale} is outside them")
    elif not info["guidance"]["embedding_dim"] and guidance_scale > 1:
        warnings.warn(f"{pipe.path}: guidance {low} is distilled into this model; guidance_scale {guidance_scale} "
                      "adds classifier-free guidance on top of it (1 turns that off)")


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str] | str, *, negative_prompts: list[str] | None = None,
             seeds: list[int] | None = None, scheduler: str | None = None, steps: int | None = None,
             guidance_scale: float | None = None, guidance_rescale: float = 0.0, width: int | None = None,
             height: int | None = None, batch_size: int = 4, eta: float = 0.0, init_image=None,
             strength: float | None = None, mask_image=None, keep_unmasked: bool = False,
             trajectory_every: int = 0, progress: bool = True, class_labels: list[str] | str | None = None,
             classifier=None, classifier_scale: float = 0.0,
             guidance_interval: tuple[float, float] | None = None) -> list[dict]:
    """One image per prompt, image i from seeds[i] (default 0, 1, ...), `batch_size` at a time.
    `scheduler`, `steps` and `guidance_scale` default to the pipeline's (`Pipeline.default_*`: a
    consistency-distilled model samples with "lcm" in a few steps at the scale it was distilled for).

    img2img with `init_image` (path or PIL; `strength` defaults to 0.8); inpainting with
    `init_image` + `mask_image` (white = regenerate; `strength` defaults to 1.0), and
    `keep_unmasked` pastes the input's pixels back outside the mask (else they go through the VAE).
    The output size is the input image's for img2img/inpainting, else the model's native size.

    Returns one dict per image: "image" (PIL), "array" (H, W, 3 float32 in [0, 1], what diffusers
    returns with output_type="np"), the settings ("prompt", "negative_prompt", "seed", "scheduler",
    "steps", "guidance_scale", "guidance_rescale", "eta", "width", "height", "mode", "strength"), and
    "trajectory": [(t, x_t PIL, predicted x0 PIL)] every `trajectory_every` steps when asked.
    `guidance_interval` (lo, hi) guides only the steps whose noise level (EDM sigma) is in (lo, hi]
    (`ldm.sampling.denoise`); None: the pipeline's recommended one (ldm.json), if any; (0, inf): every step.
    `progress` shows a bar over the batches when there are several.
    `class_labels` (one class name per prompt, or one for all) picks the class of a class-conditional
    model (none given: its null class; classifier-free guidance runs against the null class), and
    the class that `classifier` guides toward (a classifier directory or `load_classifier`'s pair;
    Dhariwal & Nichol 2021) with `classifier_scale`. An unknown name is an error listing the known ones.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    scheduler = scheduler or pipe.default_scheduler
    steps = steps if steps is not None else pipe.default_steps
    guidance_scale = guidance_scale if guidance_scale is not None else pipe.default_guidance
    guidance_interval = check_guidance_interval(guidance_interval if guidance_interval is not None
                                                else pipe.default_guidance_interval)
    make_scheduler(scheduler, pipe.base_scheduler_config)  # a bad name or schedule fails before any work
    check_distilled_guidance(pipe, guidance_scale)
    images = _image_inputs(pipe, init_image, mask_image, width, height) if init_image is not None else None
    if images is not None:
        height, width = images.image.shape[2:]
    native_height, native_width = pipe.native_height_width
    width, height = width or native_width, height or native_height
    mode = "txt2img" if images is None else "img2img" if images.mask is None else "inpaint"
    strength = strength if strength is not None else 0.8 if mode == "img2img" else 1.0
    _check_request(pipe, prompts, negative_prompts, seeds, width, height, strength, images)
    settings = dict(scheduler=scheduler, steps=steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                    guidance_interval=guidance_interval, eta=eta, width=width, height=height, mode=mode,
                    strength=strength if images is not None else None)
    wanted = [class_labels] * len(prompts) if isinstance(class_labels, str) else class_labels
    conditioning = class_conditioning(pipe, wanted, len(prompts), classifier, classifier_scale)
    if wanted is not None:
        settings.update(class_labels=list(wanted), classifier_scale=classifier_scale)
    results = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress or len(starts) == 1):
        batch = slice(start, start + batch_size)
        arrays, trajectory = _generate_batch(pipe, prompts[batch], negative_prompts[batch], seeds[batch], images,
                                             keep_unmasked, trajectory_every, settings, conditioning.batch(batch))
        for j, array in enumerate(arrays):
            results.append({
                "image": VaeImageProcessor.numpy_to_pil(array[None])[0], "array": array,
                "prompt": prompts[start + j], "negative_prompt": negative_prompts[start + j], "seed": seeds[start + j],
                **settings, "trajectory": [(t, xt[j], x0[j]) for t, xt, x0 in trajectory],
            })
    return results


@dataclasses.dataclass
class ClassConditioning:
    """What `generate` adds to `denoise` for classes: a class-conditional U-Net's labels (and its null
    class), and classifier guidance toward the wanted classes; `batch(slice)` gives denoise's kwargs."""

    labels: torch.Tensor | None = None       # (N,) the U-Net's class labels
    null: int | None = None
    guidance: ClassifierGuidance | None = None  # labels: (N,) the classifier's

    def batch(self, part: slice) -> dict:
        out = {}
        if self.labels is not None:
            labels = self.labels[part]
            out.update(class_labels=labels, uncond_class_labels=torch.full_like(labels, self.null))
        if self.guidance is not None:
            out["classifier_guidance"] = dataclasses.replace(self.guidance, labels=self.guidance.labels[part])
        return out


def class_conditioning(pipe: Pipeline, wanted: list[str] | None, n: int, classifier=None,
                       scale: float = 0.0) -> ClassConditioning:
    """Check a request's class names against the model's and the classifier's classes (errors name
    the known ones) and load the classifier, refusing one trained on another VAE's latents."""
    from ldm.models.classifier import check_classifier_vae, load_classifier

    if wanted is not None and len(wanted) != n:
        raise ValueError(f"{len(wanted)} class labels for {n} prompts")
    out = ClassConditioning()
    if pipe.classes:
        out.null = null_label(pipe.classes)
        labels = label_indices(pipe.classes, wanted) if wanted is not None else torch.full((n,), out.null)
        out.labels = labels.to(pipe.device)
    elif wanted is not None and classifier is None:
        raise ValueError(f"class labels asked of {pipe.path or 'a model'} that is not class-conditional (no classes "
                         "in its ldm.json); pass a classifier for classifier guidance, or train with labels=...")
    if classifier is not None:
        if wanted is None:
            raise ValueError("classifier guidance needs class_labels: the classes to guide toward")
        identity = vae_identity(pipe.vae)
        if isinstance(classifier, (str, Path)):
            model, record = load_classifier(classifier, expect_vae=identity)
        else:  # a (model, record) pair loaded once for many calls: checked all the same
            model, record = classifier
            check_classifier_vae(record, identity, "passed")
        model.to(device=pipe.device)
        out.guidance = ClassifierGuidance(model, label_indices(record["classes"], wanted).to(pipe.device), scale,
                                          schedule=record.get("noise_schedule"))
    return out


def _generate_batch(pipe: Pipeline, prompts, negative_prompts, seeds, images: _ImageInputs | None,
                    keep_unmasked: bool, trajectory_every: int, s: dict, classes: dict | None = None):
    """(H, W, 3) float arrays for one batch, and its trajectory [(t, [x_t PIL], [x0 PIL])].

    The random draws follow diffusers' image pipelines: the image's posterior sample, then the
    initial noise, then (9-channel inpainting) the masked image's posterior sample, each image from
    its own generator; then the scheduler's own draws.
    """
    n, f, device, dtype = len(prompts), pipe.vae_factor, pipe.device, pipe.dtype
    generators = seeded_generators(seeds)
    cond, part_weights = encode_composed(pipe, prompts)
    uncond = (encode_prompts(pipe.text_encoder, pipe.tokenizer, negative_prompts, pipe.clip_skip, device)
              if s["guidance_scale"] > 1 or part_weights is not None else None)
    scheduler = make_scheduler(s["scheduler"], pipe.base_scheduler_config)
    seed_sde_noise(scheduler, seeds)
    latent_shape = (n, pipe.vae.config.latent_channels, s["height"] // f, s["width"] // f)
    image_latents = _encode_init_image(pipe, images, generators, s["strength"])  # draws first,
    noise = initial_noise(latent_shape, generators, device, dtype)                 # then the noise,
    inpaint = _inpainting(pipe, images, generators, latent_shape)                  # then the masked image
    snapshots = []  # (i, t, x_t, predicted x0) after every step
    latents = denoise(pipe.unet, scheduler, cond, uncond, noise, num_steps=s["steps"], guidance_scale=s["guidance_scale"],
                      guidance_rescale=s["guidance_rescale"], guidance_interval=s["guidance_interval"],
                      part_weights=part_weights,
                      generator=generators, eta=s["eta"],
                      image_latents=image_latents, strength=s["strength"] or 1.0, inpaint=inpaint,
                      callback=(lambda *snapshot: snapshots.append(snapshot)) if trajectory_every else None,
                      **(classes or {}))
    # every N steps but the last, whose x_t is the image itself
    trajectory = [(t, _to_pil(decode_latents(pipe.vae, x)), _to_pil(decode_latents(pipe.vae, x0)))
                  for i, t, x, x0 in snapshots[:-1] if i % trajectory_every == 0]
    out = decode_latents(pipe.vae, latents).cpu()
    if keep_unmasked and inpaint is not None:
        out = torch.where(images.mask >= 0.5, out, images.image)
    return VaeImageProcessor.pt_to_numpy(out), trajectory


def _encode_init_image(pipe: Pipeline, images: _ImageInputs | None, generators, strength: float | None):
    """The init image's latents, one posterior sample per image, where the sampler needs them: to
    start img2img from, and for inpainting to blend back (4-channel UNet) or to start from (strength < 1)."""
    if images is None or (pipe.inpainting_unet and strength == 1.0):
        return None
    latents = encode_images(pipe.vae, images.image, generators).to(pipe.dtype)
    if images.mask is not None:
        # diffusers' inpainting repeats them into a contiguous copy; left channels-last (the image
        # processor's layout), the blended latents would be too, and the UNet would round differently
        latents = latents.contiguous()
    return latents


def _inpainting(pipe: Pipeline, images: _ImageInputs | None, generators, latent_shape) -> Inpainting | None:
    """The mask at latent size and, for a 9-channel UNet, the masked image's latents (the masked
    region gray: 0 in [-1, 1], as diffusers makes it)."""
    if images is None or images.mask is None:
        return None
    mask = torch.nn.functional.interpolate(images.mask, size=latent_shape[2:]).to(pipe.device, pipe.dtype)
    masked = None
    if pipe.inpainting_unet:
        masked = encode_images(pipe.vae, torch.where(images.mask < 0.5, images.image, 0.5), generators).to(pipe.dtype)
    return Inpainting(mask.expand(latent_shape[0], -1, -1, -1), masked)


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded as diffusers' image processor rounds."""
    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images.cpu()))


# --------------------------------------------------------------------------- files

PNG_KEYS = ("prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance_scale", "guidance_rescale",
            "guidance_interval", "eta", "width", "height", "mode", "strength")


def a1111_parameters(result: dict) -> str:
    """The "parameters" text chunk in AUTOMATIC1111's layout, which image browsers and sites read."""
    fields = [f"Steps: {result['steps']}", f"Sampler: {result['scheduler']}", f"CFG scale: {result['guidance_scale']}",
              f"Seed: {result['seed']}", f"Size: {result['width']}x{result['height']}"]
    if result["strength"] is not None:
        fields.append(f"Denoising strength: {result['strength']}")
    if result["guidance_rescale"]:
        fields.append(f"CFG rescale: {result['guidance_rescale']}")
    if result.get("guidance_interval"):
        fields.append(f"CFG interval: {list(result['guidance_interval'])}")
    return f"{result['prompt']}\nNegative prompt: {result['negative_prompt']}\n{', '.join(fields)}"


def save_with_metadata(result: dict, path: Path) -> None:
    """The image as a PNG whose text chunks hold the settings that made it (one chunk per setting)."""
    info = PngImagePlugin.PngInfo()
    for key in PNG_KEYS:
        if result[key] is not None:
            info.add_text(key, str(result[key]))
    info.add_text("parameters", a1111_parameters(result))
    result["image"].save(path, pnginfo=info)


def save_trajectory(result: dict, stem: Path) -> tuple[Path, Path]:
    """The denoising trajectory: a strip (x_t above, predicted x0 below, final image last) and a GIF of x_t."""
    from ldm.data.images import image_grid

    frames = [xt for _, xt, _ in result["trajectory"]] + [result["image"]]
    preds = [x0 for _, _, x0 in result["trajectory"]] + [result["image"]]
    strip, gif = stem.with_name(stem.name + "-trajectory.png"), stem.with_name(stem.name + "-trajectory.gif")
    image_grid(frames + preds, nrow=len(frames)).save(strip)
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=150, loop=0)
    return strip, gif


# --------------------------------------------------------------------------- command line

# What one line of a .jsonl prompts file may set, beside "prompt" (the CLI's flags otherwise).
PER_PROMPT = ("negative_prompt", "seed", "num_images", "scheduler", "steps", "guidance_scale", "guidance_rescale",
              "guidance_interval", "eta", "width", "height", "strength")
# Images that agree on these are generated in one batch.
BATCH_SETTINGS = ("scheduler", "steps", "guidance_scale", "guidance_rescale", "guidance_interval", "eta", "width", "height",
                  "strength")


def read_prompts(prompt_args: list[str] | None, prompts_file: str | None) -> list[dict]:
    """Prompts from --prompt (repeatable) and --prompts FILE (.jsonl: one JSON object per line with
    "prompt" and any PER_PROMPT setting; otherwise one prompt per line)."""
    items = [{"prompt": p} for p in prompt_args or []]
    if prompts_file:
        path = Path(prompts_file)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                items.append(_parse_jsonl_line(line, f"{path}:{number}") if path.suffix == ".jsonl" else {"prompt": line.strip()})
    if not items:
        raise SystemExit("give at least one --prompt or a --prompts file")
    return items


def _parse_jsonl_line(line: str, where: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise SystemExit(f"{where}: not JSON ({err})") from err
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise SystemExit(f'{where}: expected an object with a "prompt" string')
    unknown = sorted(set(item) - {"prompt", *PER_PROMPT})
    if unknown:
        raise SystemExit(f"{where}: unknown key(s) {unknown}; a line may set {['prompt', *PER_PROMPT]}")
    return item


def plan_images(items: list[dict], args: argparse.Namespace) -> list[dict]:
    """One job per image: prompt, negative prompt, seed and the batch settings.

    An item's images use its "seed", "seed" + 1, ...; other images use --seed + their index.
    """
    jobs = []
    for item in items:
        for j in range(int(item.get("num_images", args.num_images))):
            index = len(jobs)
            jobs.append({"index": index, "prompt": item["prompt"],
                         "negative_prompt": item.get("negative_prompt", args.negative_prompt),
                         "seed": item["seed"] + j if "seed" in item else args.seed + index,
                         **{k: item.get(k, getattr(args, k)) for k in BATCH_SETTINGS}})
            if jobs[-1]["guidance_interval"] is not None:  # a list from the flag or the JSON line: a batch key
                jobs[-1]["guidance_interval"] = tuple(jobs[-1]["guidance_interval"])
    return jobs


def group_batches(jobs: list[dict]) -> list[list[dict]]:
    """Jobs grouped by their batch settings, in order of first appearance (generate batches each group)."""
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        groups.setdefault(tuple(job[k] for k in BATCH_SETTINGS), []).append(job)
    return list(groups.values())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Text-to-image, img2img and inpainting with a Stable Diffusion-style pipeline.")
    p.add_argument("model", nargs="?", help="run dir, pipeline dir, SD diffusers dir, or single-file .safetensors")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="file: one prompt per line, or .jsonl with a prompt and settings per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--scheduler", help="sampler short name (see --list-schedulers); default: the pipeline's")
    p.add_argument("--list-schedulers", action="store_true", help="print the sampler names and exit")
    p.add_argument("--steps", type=int, help=f"denoising steps (img2img runs strength * steps); default: the "
                   f"pipeline's ({DEFAULT_STEPS}; a distilled one's, e.g. 4)")
    p.add_argument("--guidance-scale", type=float, help=f"classifier-free guidance; 1 turns it off; default: the "
                   f"pipeline's ({DEFAULT_GUIDANCE}; a distilled one's, its distilled scale)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="0..1; 0.7 for zero-terminal-SNR models")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only the steps whose noise level (EDM sigma) is in (LO, HI] (Kynkaanniemi et al. 2024); "
                   "default: the pipeline's (ldm.json), else every step; 0 inf: every step")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (same settings only)")
    p.add_argument("--width", type=int, help="default: the init image's, else the model's native size")
    p.add_argument("--height", type=int)
    p.add_argument("--init-image", help="img2img / inpainting source image")
    p.add_argument("--strength", type=float, help="how much of the image to re-noise, (0, 1]; default 0.8 for "
                   "img2img, 1.0 for inpainting")
    p.add_argument("--mask", help="inpainting mask image (white = regenerate)")
    p.add_argument("--keep-unmasked", action="store_true", help="inpainting: paste the input's pixels back outside the mask")
    p.add_argument("--class", dest="class_name", help="the class of every image: a class-conditional model's "
                   "(its ldm.json's classes), and the one --classifier guides toward")
    p.add_argument("--classifier", help="classifier guidance: a train_classifier.py output dir (<run>/classifier)")
    p.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance scale s (0: off)")
    p.add_argument("--device", help="cuda | mps | cpu (default: the best available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bfloat16/float16 on GPU, float32 on CPU")
    p.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa")
    p.add_argument("--fast", action="store_true",
                   help="GPU: fused QKV, channels_last, torch.compile with CUDA graphs (each new batch size compiles first)")
    p.add_argument("--trajectory", type=int, default=0, help="save the denoising trajectory every N steps (strip + GIF)")
    p.add_argument("--out", default="outputs", help="output directory")
    p.add_argument("--lora", action="append", default=[], type=parse_lora, metavar="PATH[:STRENGTH]",
                   help="fold a LoRA (file or directory, any format diffusers reads) into the model; repeat for several")
    p.add_argument("--export-single-file", metavar="OUT.safetensors",
                   help="write the model as one original-layout .safetensors (then generate only if prompts are given)")
    p.add_argument("--export-diffusers", metavar="DIR",
                   help="write a single-file checkpoint as a diffusers pipeline directory (what training reads)")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickled .ckpt (read with weights_only=True)")
    return p


def list_schedulers() -> str:
    return "\n".join(f"{name:16s} {cls.__name__:34s} {about}" for name, (cls, _, about) in SCHEDULERS.items())


def _export(model: str, out: str) -> None:
    from ldm.export import export_single_file

    source = resolve_pipeline_dir(model)
    if not source.is_dir():
        raise SystemExit(f"--export-single-file: {model} is already a single file")
    print(f"wrote {export_single_file(source, out)}")


def _export_diffusers(model: str, out: str, allow_pickle: bool) -> None:
    from ldm.export import import_single_file

    if not Path(model).is_file():
        raise SystemExit(f"--export-diffusers: {model} is not a single file (a directory already is diffusers')")
    import_single_file(model, out_dir=out, allow_pickle=allow_pickle)
    print(f"wrote {out}")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.list_schedulers:
        print(list_schedulers())
        return
    if not args.model:
        raise SystemExit("give a model: a run dir, pipeline dir, SD diffusers dir or .safetensors file")
    try:
        if args.export_single_file:
            _export(args.model, args.export_single_file)
        if args.export_diffusers:
            _export_diffusers(args.model, args.export_diffusers, args.allow_pickle)
        if args.prompt or args.prompts or not (args.export_single_file or args.export_diffusers):
            _run(args)
    except (ValueError, FileNotFoundError, ImportError) as err:  # bad input: a message, not a traceback
        raise SystemExit(f"error: {err}") from err


def _run(args: argparse.Namespace) -> None:
    from ldm.data.images import image_grid

    jobs = plan_images(read_prompts(args.prompt, args.prompts), args)
    if args.fast and args.attention == "xformers":
        raise SystemExit("--fast fuses the attention projections for SDPA; it does not combine with --attention xformers")
    pipe = load_pipeline(args.model, args.device, args.dtype, args.attention, args.allow_pickle,
                         fast=FastConfig.sampling() if args.fast else None, loras=args.lora)
    classifier = None
    if args.classifier:  # loaded once, checked against this model's VAE
        from ldm.models.classifier import load_classifier

        classifier = load_classifier(args.classifier, expect_vae=vae_identity(pipe.vae))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = [{}] * len(jobs)
    for group in group_batches(jobs):
        made = generate(pipe, [j["prompt"] for j in group], negative_prompts=[j["negative_prompt"] for j in group],
                        seeds=[j["seed"] for j in group], batch_size=args.batch_size, init_image=args.init_image,
                        mask_image=args.mask, keep_unmasked=args.keep_unmasked, trajectory_every=args.trajectory,
                        class_labels=args.class_name, classifier=classifier, classifier_scale=args.classifier_scale,
                        **{k: group[0][k] for k in BATCH_SETTINGS})
        for job, result in zip(group, made):
            results[job["index"]] = result
    for i, result in enumerate(results):
        stem = out / f"{i:04d}-seed{result['seed']}"
        save_with_metadata(result, stem.with_suffix(".png"))
        if result["trajectory"]:
            save_trajectory(result, stem)
    sizes = {r["image"].size for r in results}
    if len(sizes) == 1:
        image_grid([r["image"] for r in results]).save(out / "grid.png")
    print(f"wrote {len(results)} images to {out}" + ("" if len(sizes) == 1 else " (sizes differ: no grid.png)"))
