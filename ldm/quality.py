"""Generated images measured against real held-out ones: FID, KID, caption retrieval (issue #19).

`QualityEval` holds what stays fixed across a run: N held-out images with their captions (the
prompts, one image per prompt from a fixed seed each), N training images, and one feature
network. Each call measures a set of N generated images and returns flat figures:

    fid, kid                 generated vs held-out images (Heusel et al. 2017; Binkowski et al. 2018)
    fid_floor, kid_floor     training vs held-out images, the same N: what a perfect model would
                             score with this N and this network (FID is biased upward at small N)
    top1, top5, mean_rank    the rank of each prompt among the N held-out captions (distinct texts)
                             for the image generated from it, by CLIP similarity
    top1_ceiling, ...        the same ranks for the real held-out images: what the CLIP can read
    top1_chance, ...         a ranking at random
    <figure>_lo, <figure>_hi bootstrap 95% intervals (images resampled; see metrics.bootstrap_interval)
    features, n, candidates  the network's identity, N, and the number of distinct captions

Figures made with another network or another N are not comparable: `ldm.metrics.check_comparable`
refuses them. A network is named `kind:path@hash`, the hash being that of its weights.

Feature networks (`spec`): "clip:<dir>" (a CLIP that train_clip.py wrote: image tower for
FID/KID, both towers for retrieval), "inception:<file>" (FID's Inception-v3 from a local file:
FID/KID only; "inception:" alone is torch's hub cache).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ldm.config import ConfigError, from_dict
from ldm.data.images import DataConfig, load_images
from ldm.data.split import key_hash
from ldm.metrics import (FeatureNet, bootstrap_interval, caption_ranks, chance_figures, check_comparable,
                         extract_features, frechet_distance, inception_features, kernel_distance, retrieval_figures)

FEATURE_KINDS = ("clip", "inception")
RETRIEVAL = ("top1", "top5", "mean_rank")


@dataclasses.dataclass
class FeatureNetwork:
    """A feature network and its name: `image` maps images in [-1, 1] to (B, D); `text` maps
    captions to (B, D) in the same space (CLIP only; None for Inception)."""

    identity: str
    image: nn.Module
    text: Callable[[list[str]], torch.Tensor] | None = None


def spec_problem(spec: str) -> str | None:
    """Why `spec` names no usable feature network, or None (used by the configs' validate())."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in FEATURE_KINDS:
        return f"{spec!r} is not clip:<dir> or inception:<file>"
    if kind == "clip" and not (Path(path) / "image_encoder" / "config.json").is_file():
        return f"{path!r} holds no CLIP trained by train_clip.py (no image_encoder/config.json): it has no image tower"
    if kind == "inception":
        from ldm.metrics import default_inception_path

        weights = Path(path) if path else default_inception_path()
        if not weights.is_file():
            return f"no Inception weights file at {weights}"
    return None


def default_features(text_encoder: str) -> tuple[str, str]:
    """("clip:<dir>", "") when the run's text encoder directory is a CLIP that train_clip.py
    trained (it has the image tower), else ("", why there is no default network)."""
    if text_encoder and (Path(text_encoder) / "image_encoder" / "config.json").is_file():
        return f"clip:{text_encoder}", ""
    return "", (f"the text encoder {text_encoder or '(none)'} is not a CLIP trained by train_clip.py (no image tower); "
                "set validation.features to clip:<dir> or inception:<file>")


def load_feature_network(spec: str, device: torch.device | str = "cpu") -> FeatureNetwork:
    """The network `spec` names, frozen, on `device`, with its identity `spec@<weights hash>`."""
    from ldm.models.vae import weights_hash

    problem = spec_problem(spec)
    if problem:
        raise ValueError(f"features: {problem}")
    kind, _, path = spec.partition(":")
    if kind == "clip":
        from ldm.train.clip import load_clip_scorer

        scorer = load_clip_scorer(path, device)
        image = FeatureNet(scorer.image_features, scorer.text_projection.shape[1])
        return FeatureNetwork(f"{spec}@{weights_hash(scorer)[:8]}", image, scorer.text_features)
    net = inception_features(path or None).to(device).eval()
    return FeatureNetwork(f"{spec}@{weights_hash(net)[:8]}", net)


def data_config_of_cache(manifest: dict) -> DataConfig:
    """The data config a latent cache was encoded from (its manifest records the source, the
    transform and the held-out split's settings), so stage 3 can read the real images behind its
    held-out latents. Keys the manifest lacks keep their defaults."""
    names = {f.name for f in dataclasses.fields(DataConfig)} - {"captions"}
    data = {k: manifest[k] for k in names if k in manifest}
    data.update({k: v for k, v in (manifest.get("split") or {}).items() if k in names})  # eval_size / eval_fraction / heldout
    return from_dict(DataConfig, data)


def training_stride(data: DataConfig, n: int) -> int:
    """Take every k-th training record for the floor, so its N images span a folder sorted by name
    or class rather than being its first N; 1 for shapes (drawn at random) and for streams."""
    from ldm.data.images import plan_split
    from ldm.data.sources import open_source

    if data.source.kind == "shapes":
        return 1
    source = open_source(data.source)
    if not hasattr(source, "__len__"):
        return 1
    held = plan_split(data).keys
    return max(1, (len(source) - len(held or ())) // max(n, 1))


def real_images(data: DataConfig, n: int, offset: int = 0) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(n held-out images, their first captions, n training images spread over the split), square
    at the data's resolution (center crop, no flip: the feature networks take one size, and a random
    crop would change the reference between runs). "" where an image has no caption.

    important: the n held-out images are those with the smallest key hashes, not the first n: a
    folder is sorted by name or category, so its first n held-out files are a few kinds only.
    `offset`: skip that many first (in the same order); with offset = n, a second set of n held-out
    images to choose settings on, leaving the first n, the ones a run's own figures use, for the report."""
    transform = dataclasses.replace(data.transform, buckets=False, crop="center", flip=False)
    data = dataclasses.replace(data, transform=transform)
    held_out = load_images(data, "eval", desc="quality: held-out images")
    if offset and offset + 2 > len(held_out):  # before the training images are read
        raise ValueError(f"offset {offset}: the data holds {len(held_out)} held-out images, "
                         "and FID/KID need at least 2 after the offset")
    stride = training_stride(data, n)
    # every stride-th record of the first stride x n (load_images' rank 0 of `stride` processes)
    reference = load_images(dataclasses.replace(data, max_images=stride * n), "train", rank=0, world=stride,
                            desc="quality: training images")
    count = min(n, len(held_out) - offset, len(reference))
    order = sorted(range(len(held_out)), key=lambda i: (key_hash(held_out.ids[i]), held_out.ids[i]))
    chosen = order[offset:offset + count]
    captions = [held_out.captions[i][0] if held_out.captions[i] else "" for i in chosen]
    return held_out.batch(chosen), captions, reference.batch(list(range(count)))


def check_min_images(n: int, have_held_out: int, have_train: int) -> None:
    """FID and KID need 2 images per set; name what is needed and what there is."""
    if min(have_held_out, have_train) < 2:
        raise ValueError(f"quality evaluation needs at least 2 held-out and 2 training images (n={n} asked); "
                         f"the data has {have_held_out} held-out and {have_train} training images")


class QualityEval:
    """FID/KID against held-out images with the real-vs-real floor, caption retrieval with its
    ceiling and chance, and bootstrap intervals on each; what stays fixed is computed once here."""

    def __init__(self, network: FeatureNetwork, held_out: torch.Tensor, captions: list[str], reference: torch.Tensor,
                 resamples: int = 200, seed: int = 0, log: Callable[[str], None] = print):
        check_min_images(len(held_out), len(held_out), len(reference))
        if len(reference) != len(held_out):
            raise ValueError(f"the floor needs as many training images as held-out ones: {len(reference)} vs {len(held_out)}")
        self.network, self.captions, self.resamples, self.seed = network, list(captions), resamples, seed
        self.n = len(held_out)
        self.seeds = list(range(seed * 100_000, seed * 100_000 + self.n))  # image i from seed i: comparable across steps
        self.real_f = extract_features(held_out, network.image)
        self.note = self._retrieval_problem()
        if self.note:
            log(f"quality: caption retrieval skipped: {self.note}")
        self.fixed = {"features": network.identity, "n": self.n}
        floor = self._distances(self.real_f, extract_features(reference, network.image))
        self.fixed.update({_suffixed(k, "floor"): v for k, v in floor.items()})
        if not self.note:
            self.text_f = network.text(self.captions).cpu()
            self.real_ranks, candidates = caption_ranks(self.real_f, self.text_f, self.captions)
            self.fixed.update({_suffixed(k, "ceiling"): v for k, v in self._retrieval(self.real_ranks).items()})
            self.fixed.update({f"{k}_chance": v for k, v in chance_figures(candidates).items()})
            self.fixed["candidates"] = candidates

    @property
    def prompts(self) -> list[str]:
        return self.captions

    def _retrieval_problem(self) -> str:
        if self.network.text is None:
            return f"{self.network.identity} has no text tower (retrieval needs a CLIP)"
        missing = sum(1 for c in self.captions if not c)
        if missing:
            return f"{missing} of the {self.n} held-out images have no caption"
        return ""

    def _distances(self, real_f: torch.Tensor, fake_f: torch.Tensor) -> dict[str, float]:
        """FID and KID, with intervals from resampling the N (held-out, other) pairs."""
        def statistic(idx):
            return {"fid": frechet_distance(real_f[idx], fake_f[idx]), "kid": kernel_distance(real_f[idx], fake_f[idx])}

        figures = statistic(torch.arange(len(real_f)))
        return _with_intervals(figures, bootstrap_interval(statistic, len(real_f), self.resamples, self.seed, center=figures))

    def _ranks(self, image_f: torch.Tensor) -> torch.Tensor:
        return caption_ranks(image_f, self.text_f, self.captions)[0]

    def _retrieval(self, ranks: torch.Tensor) -> dict[str, float]:
        intervals = bootstrap_interval(lambda idx: retrieval_figures(ranks[idx]), len(ranks), self.resamples, self.seed)
        return _with_intervals(retrieval_figures(ranks), intervals)

    def item_ranks(self, generated: torch.Tensor) -> list[dict]:
        """Per image: its prompt, the rank of that prompt for the generated image and for the real held-out
        one (1 = found): the misses to look at behind top-1. Empty when retrieval is skipped."""
        if self.note:
            return []
        ranks = self._ranks(extract_features(generated, self.network.image))
        return [{"caption": c, "rank": int(r), "real_rank": int(rr)}
                for c, r, rr in zip(self.captions, ranks.tolist(), self.real_ranks.tolist())]

    def __call__(self, generated: torch.Tensor) -> dict:
        """The figures of `generated` ((N, 3, H, W) in [-1, 1], image i from prompt i and seed i)."""
        if len(generated) != self.n:
            raise ValueError(f"quality: {len(generated)} generated images for {self.n} prompts")
        fake_f = extract_features(generated, self.network.image)
        figures = self._distances(self.real_f, fake_f)
        if not self.note:
            figures.update(self._retrieval(self._ranks(fake_f)))
        else:
            figures["retrieval_skipped"] = self.note
        return {**figures, **self.fixed}


def _suffixed(key: str, what: str) -> str:
    """fid -> fid_floor, fid_lo -> fid_floor_lo."""
    for end in ("_lo", "_hi"):
        if key.endswith(end):
            return f"{key[:-len(end)]}_{what}{end}"
    return f"{key}_{what}"


def _with_intervals(values: dict[str, float], intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = dict(values)
    for key, (lo, hi) in intervals.items():
        out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
    return out


def summary_line(figures: dict) -> str:
    """One line for a log: each figure with its interval and floor or ceiling, and the network."""
    parts = []
    for key, fmt, ref in (("fid", "{:.2f}", "floor"), ("kid", "{:.4f}", "floor"), ("top1", "{:.0%}", "ceiling"),
                          ("top5", "{:.0%}", "ceiling"), ("mean_rank", "{:.1f}", "ceiling")):
        if key not in figures:
            continue
        text = f"{key} {fmt.format(figures[key])}"
        if f"{key}_lo" in figures:
            text += f" [{fmt.format(figures[f'{key}_lo'])}, {fmt.format(figures[f'{key}_hi'])}]"
        text += f" ({ref} {fmt.format(figures[f'{key}_{ref}'])}"
        text += f", chance {fmt.format(figures[f'{key}_chance'])})" if f"{key}_chance" in figures else ")"
        parts.append(text)
    return f"{', '.join(parts)}; {figures['features']}, n={figures['n']}"


def earlier_figures(metrics_path: Path, prefix: str = "quality/") -> dict | None:
    """The network and N of the last figures a run's metrics.jsonl holds under `prefix`
    ({"features", "n", "step"}), or None."""
    if not metrics_path.is_file():
        return None
    found = None
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if isinstance(record, dict) and f"{prefix}features" in record:
            found = {"features": record[f"{prefix}features"], "n": record.get(f"{prefix}n"), "step": record.get("step")}
    return found


def check_run_history(metrics_path: Path, features: str, n: int, prefix: str = "quality/",
                      keys: str = "validation.features/quality_n") -> None:
    """A resumed run must measure with the network and N its earlier figures were made with."""
    earlier = earlier_figures(metrics_path, prefix)
    if earlier is not None:
        check_comparable({"features": features, "n": n}, earlier, "this run's figures",
                         f"the earlier ones in {metrics_path} (step {earlier['step']}); "
                         f"set {keys} as before, or use a new out_dir")


class Stopwatch:
    """Seconds spent inside `with` blocks, summed: the cost of evaluation against the run's time."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.last = time.perf_counter() - self._start
        self.seconds += self.last


def check_spec(key: str, spec: str) -> None:
    """A config's validate(): a named network must exist before any work starts."""
    if spec:
        problem = spec_problem(spec)
        if problem:
            raise ConfigError(f"{key}: {problem}")
