"""``shapes``: the embedded synthetic dataset, and an analyzer that reads its scenes back.

Every image is a flat background with one (or two) coloured shapes, drawn in-process at any
resolution from a ``Scene``; a caption in plain words says what is in it. Because the
vocabulary is tiny and the renderer is exact, a model trained on it can be checked for
prompt adherence without a second network: ``analyze`` recovers colour, shape, size,
position and background from a generated image, and ``score`` turns that into accuracies.
``exclude`` keeps chosen attribute combinations (say, every purple star) out of training so
that generalisation to unseen combinations can be measured.

Geometry is in fractions of the image side. A shape's *bounding radius* is the distance
from its centre to its farthest point (square: half-diagonal; triangle: circumradius).
Pixel coordinates are continuous, pixel ``i`` spanning ``[i, i + 1)``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 200),
    "orange": (245, 130, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: dict[str, float] = {"small": 0.10, "large": 0.22}  # bounding radius / side
POSITIONS: dict[str, tuple[float, float]] = {  # object centre (x, y) / side
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}

MAX_JITTER = 0.03  # a large object on the left moved 0.03 further left just touches the edge
MIN_GAP = 0.03  # clearance between the bounding circles of two objects, so they never touch
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star
CIRCLE_VERTICES = 64  # the circle is a polygon, so every shape goes through one rasterizer

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PHRASINGS: tuple[str, ...] = (
    "{objects}, on a {background} background",
    "{objects} on {background}",
    "{background} background with {objects}",
    "on a {background} background, {objects}",
    "a picture of {objects}, {background} background",
)

# Area of each shape divided by its squared bounding radius: lets the analyzer turn a
# measured area into the radius each shape hypothesis implies.
AREA_PER_RADIUS2: dict[str, float] = {
    "circle": 0.5 * CIRCLE_VERTICES * math.sin(2 * math.pi / CIRCLE_VERTICES),
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * STAR_INNER * math.sin(math.pi / 5),
}

FOREGROUND_DISTANCE = 48.0  # RGB distance from the background that marks a pixel as object
BLURS = (0.0, 0.5, 1.0)  # Gaussian sigmas (px) tried on shape templates: generated images are soft
MIN_OBJECT_AREA = 0.002  # components smaller than this fraction of the image are noise
ANALYSIS_SIDE = 128  # larger images are analyzed at 128..255 px
_ATTRIBUTES = ("shape", "color", "size", "position")
_VOCABULARY = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene; ``dx``/``dy`` are the jitter of its centre, in fractions of the side."""

    shape: str
    color: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self):
        for attribute in _ATTRIBUTES:
            _check_value(attribute, getattr(self, attribute))

    def center(self) -> tuple[float, float]:
        x, y = POSITIONS[self.position]
        return x + self.dx, y + self.dy


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]

    def __post_init__(self):
        _check_value("background", self.background)
        if not isinstance(self.objects, tuple):
            raise TypeError(f"Scene.objects must be a tuple (scenes are hashable), got {type(self.objects).__name__}")


def _check_value(attribute: str, value: str) -> None:
    """A misspelt word would otherwise surface later as a KeyError, or silently match nothing."""
    if value not in _VOCABULARY[attribute]:
        raise ValueError(f"unknown {attribute} {value!r}; expected one of {_VOCABULARY[attribute]}")


# ----------------------------------------------------------------------------- sampling


def _randint(rng: random.Random | np.random.Generator, n: int) -> int:
    """Both kinds of generator are accepted, so callers keep the one they already seed."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    return rng.randrange(n)


def _choice(rng, options: Sequence):
    return options[_randint(rng, len(options))]


def _check_exclude(exclude) -> tuple[Mapping[str, str], ...]:
    """Reject a misspelt key or value now: it would otherwise silently exclude nothing."""
    entries = tuple(exclude)
    for entry in entries:
        if not isinstance(entry, Mapping) or not entry:
            raise ValueError(f"exclude entries must be non-empty dicts, got {entry!r}")
        for key, value in entry.items():
            if key not in _VOCABULARY:
                raise ValueError(f"exclude: unknown key {key!r}; expected one of {sorted(_VOCABULARY)}")
            _check_value(key, value)
    return entries


def is_excluded(scene: Scene, exclude) -> bool:
    """True if some object (with the scene's background) matches every key of some entry."""
    for entry in exclude:
        for obj in scene.objects:
            attributes = {"background": scene.background, **{a: getattr(obj, a) for a in _ATTRIBUTES}}
            if all(attributes[key] == value for key, value in entry.items()):
                return True
    return False


def _gap(a: ShapeObject, b: ShapeObject) -> float:
    """Clearance between the bounding circles of two objects (negative if they may overlap)."""
    (ax, ay), (bx, by) = a.center(), b.center()
    return math.hypot(ax - bx, ay - by) - SIZES[a.size] - SIZES[b.size]


def _sample_object(rng) -> ShapeObject:
    return ShapeObject(
        shape=_choice(rng, SHAPES),
        color=_choice(rng, tuple(COLORS)),
        size=_choice(rng, tuple(SIZES)),
        position=_choice(rng, tuple(POSITIONS)),
    )


def _jittered(rng, obj: ShapeObject, jitter: float) -> ShapeObject:
    dx, dy = (float(rng.uniform(-jitter, jitter)) for _ in range(2))
    return ShapeObject(obj.shape, obj.color, obj.size, obj.position, dx, dy)


def _fits(objects: Sequence[ShapeObject]) -> bool:
    """Objects must keep MIN_GAP between their bounding circles (so never share an anchor)."""
    return all(_gap(a, b) >= MIN_GAP for i, a in enumerate(objects) for b in objects[i + 1 :])


def sample_scene(
    rng: random.Random | np.random.Generator,
    num_objects: int = 1,
    exclude=(),
    jitter: float = 0.03,
) -> Scene:
    """Draw a scene uniformly over the allowed attribute combinations, then jitter it.

    Attributes are drawn first and rejected if excluded or if the objects cannot fit apart
    at their anchors (e.g. anything large next to "center"); jitter is then redrawn until
    the objects stay MIN_GAP apart, which always ends because zero jitter fits.
    """
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    if not 0.0 <= jitter <= MAX_JITTER:
        raise ValueError(f"jitter must be in [0, {MAX_JITTER}] (more lets large objects leave the frame), got {jitter}")
    exclude = _check_exclude(exclude)
    for _ in range(10_000):
        background = _choice(rng, tuple(BACKGROUNDS))
        objects = tuple(_sample_object(rng) for _ in range(num_objects))
        if _fits(objects) and not is_excluded(Scene(background, objects), exclude):
            break
    else:
        raise ValueError(f"exclude={list(exclude)!r} leaves (almost) no scene to sample")
    while True:
        moved = tuple(_jittered(rng, obj, jitter) for obj in objects)
        if _fits(moved):
            return Scene(background, moved)


def all_single_object_scenes(exclude=(), only=()) -> list[Scene]:
    """Every single-object combination without jitter: 6 colours x 4 shapes x 2 sizes x 5 positions x 3 backgrounds;
    those matching an entry of ``exclude`` left out and, if ``only`` is given, those matching none of its entries."""
    exclude, only = _check_exclude(exclude), _check_exclude(only)
    scenes = [
        Scene(background, (ShapeObject(shape, color, size, position),))
        for background in BACKGROUNDS
        for shape in SHAPES
        for color in COLORS
        for size in SIZES
        for position in POSITIONS
    ]
    return [scene for scene in scenes if not is_excluded(scene, exclude) and (not only or is_excluded(scene, only))]


# ---------------------------------------------------------------------------- rendering


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of an upright shape with bounding radius ``r`` centred at (cx, cy); y points down."""
    if shape == "circle":
        angles = [2 * math.pi * k / CIRCLE_VERTICES for k in range(CIRCLE_VERTICES)]
        radii = [r] * CIRCLE_VERTICES
    elif shape == "square":
        angles = [math.pi / 4 + math.pi / 2 * k for k in range(4)]
        radii = [r] * 4
    elif shape == "triangle":
        angles = [-math.pi / 2 + 2 * math.pi / 3 * k for k in range(3)]
        radii = [r] * 3
    elif shape == "star":
        angles = [-math.pi / 2 + math.pi / 5 * k for k in range(10)]
        radii = [r if k % 2 == 0 else STAR_INNER * r for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return [(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii)]


def _draw(draw: ImageDraw.ImageDraw, shape, cx, cy, r, scale: int, fill) -> None:
    """Draw on a canvas ``scale`` times finer; PIL samples pixel centres at integer coordinates."""
    points = [(x * scale - 0.5, y * scale - 0.5) for x, y in _outline(shape, cx, cy, r)]
    draw.polygon(points, fill=fill)


def _supersampling(pixels: int) -> int:
    """4x anti-aliasing is cheap up to a few hundred pixels; beyond that 2x already looks smooth."""
    return 4 if pixels < 512 else 2 if pixels <= 1024 else 1


def render(scene: Scene, resolution: int) -> Image.Image:
    """Draw the scene at ``resolution`` x ``resolution``, anti-aliased by box-filtered supersampling."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    scale = _supersampling(resolution)
    canvas = Image.new("RGB", (resolution * scale,) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x, y = obj.center()
        r = SIZES[obj.size] * resolution
        _draw(draw, obj.shape, x * resolution, y * resolution, r, scale, COLORS[obj.color])
    return canvas.reduce(scale) if scale > 1 else canvas


# ----------------------------------------------------------------------------- captions


def _object_phrase(obj: ShapeObject, omit: frozenset[str] = frozenset()) -> str:
    words = [obj.size, obj.color, "shape" if "shape" in omit else obj.shape, POSITION_PHRASES[obj.position]]
    words = [w for w, a in zip(words, ("size", "color", "", "position")) if a not in omit]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def caption(scene: Scene, rng=None, phrasing: int | None = None, omit=frozenset()) -> str:
    """Describe the scene in words; ``phrasing`` picks a template, else ``rng`` does, else the first.

    ``omit`` leaves attributes unsaid (``partial_caption``): a shape becomes "a shape", a missing
    background drops the template and leaves the objects alone."""
    if phrasing is None:
        phrasing = _randint(rng, len(PHRASINGS)) if rng is not None else 0
    omit = frozenset(omit)
    objects = " and ".join(_object_phrase(obj, omit) for obj in scene.objects)
    if "background" in omit:
        return objects
    return PHRASINGS[phrasing].format(objects=objects, background=scene.background)


def partial_caption(scene: Scene, rng: np.random.Generator, p: float, phrasing: int = 0) -> str:
    """The caption with each attribute (of all five) left unsaid with probability ``p``, independently:
    "a red shape on the left", "a large star, on a gray background". Trained on these beside full
    captions, a model is told what each word does on its own, not only in the combinations it saw."""
    omit = frozenset(a for a in (*_ATTRIBUTES, "background") if rng.random() < p)
    return caption(scene, phrasing=phrasing, omit=omit)


def part_caption(scene: Scene, rng: np.random.Generator, p: float, phrasing: int = 0) -> str:
    """The caption, or with probability ``p`` one of its two parts, at even odds: the objects alone
    ("a small green square at the top") or the background alone ("a shape, on a black background").
    Trained on these beside full captions, a model can be asked for each part apart and the parts'
    predictions composed (``ldm.infer``'s "AND" prompts), as Liu et al. 2022 compose concepts."""
    if rng.random() >= p:
        return caption(scene, phrasing=phrasing)
    omit = {"background"} if rng.random() < 0.5 else set(_ATTRIBUTES)
    return caption(scene, phrasing=phrasing, omit=omit)


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in words)


_OBJECT_RE = re.compile(
    rf"a ({_alternatives(SIZES)}) ({_alternatives(COLORS)}) ({_alternatives(SHAPES)}) "
    rf"({_alternatives(POSITION_PHRASES.values())})"
)
_PHRASING_RES = tuple(
    re.compile(
        re.escape(p)
        .replace(re.escape("{objects}"), "(?P<objects>.+)")
        .replace(re.escape("{background}"), f"(?P<background>{_alternatives(BACKGROUNDS)})")
    )
    for p in PHRASINGS
)
_POSITION_OF_PHRASE = {phrase: position for position, phrase in POSITION_PHRASES.items()}


def _parse_objects(text: str) -> tuple[ShapeObject, ...] | None:
    objects = []
    for part in text.split(" and "):
        match = _OBJECT_RE.fullmatch(part)
        if match is None:
            return None
        size, color, shape, where = match.groups()
        objects.append(ShapeObject(shape, color, size, _POSITION_OF_PHRASE[where]))
    return tuple(objects)


def parse_caption(text: str) -> Scene:
    """Inverse of ``caption`` for every phrasing (case and surrounding spaces ignored); jitter is 0."""
    return _parse_phrased(text)[0]


def _parse_phrased(text: str) -> tuple[Scene, int]:
    normalized = " ".join(text.lower().split()).rstrip(".")
    for phrasing, pattern in enumerate(_PHRASING_RES):
        match = pattern.fullmatch(normalized)
        objects = _parse_objects(match["objects"]) if match else None
        if objects:
            return Scene(match["background"], objects), phrasing
    raise ValueError(f"not a shapes caption: {text!r}")


def composed_caption(text: str) -> str:
    """A caption as a composed prompt (``ldm.infer.prompt_parts``): its objects AND its background, in its
    phrasing: "a small green square at the top AND a shape, on a black background". Each part is a caption
    that ``part_dropout`` trains on."""
    scene, phrasing = _parse_phrased(text)
    return f"{caption(scene, omit={'background'})} AND {caption(scene, phrasing=phrasing, omit=set(_ATTRIBUTES))}"


# ------------------------------------------------------------------------------ dataset


class ShapesDataset(torch.utils.data.Dataset):
    """Captioned shape images made on the fly; item ``i`` is a pure function of ``(seed, i)``.

    Items are ``dict(image=PIL RGB, caption=str | list[str], scene=Scene)``; with
    ``captions_per_image > 1`` the captions use distinct phrasings (cycling if more are asked
    for than exist), so a caption-sampling loader sees the same scene said different ways.
    """

    def __init__(
        self,
        size: int = 10000,
        resolution: int = 64,
        seed: int = 0,
        num_objects: int = 1,
        exclude=(),
        jitter: float = 0.03,
        captions_per_image: int = 1,
        two_object_fraction: float = 0.0,
        attribute_dropout: float = 0.0,
        part_dropout: float = 0.0,
    ):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        if not 0.0 <= two_object_fraction <= 1.0 or (two_object_fraction and num_objects != 1):
            raise ValueError(f"two_object_fraction must be in [0, 1], with num_objects=1, got {two_object_fraction} "
                             f"with num_objects={num_objects}")
        if not 0.0 <= attribute_dropout < 1.0:
            raise ValueError(f"attribute_dropout must be in [0, 1), got {attribute_dropout}")
        if not 0.0 <= part_dropout < 1.0 or (part_dropout and attribute_dropout):
            raise ValueError(f"part_dropout must be in [0, 1), and not with attribute_dropout, got {part_dropout}")
        self.two_object_fraction, self.attribute_dropout = two_object_fraction, attribute_dropout
        self.part_dropout = part_dropout
        self.size, self.resolution, self.seed = size, resolution, seed
        self.num_objects, self.exclude, self.jitter = num_objects, _check_exclude(exclude), jitter
        self.captions_per_image = captions_per_image
        sample_scene(np.random.default_rng(seed), num_objects, self.exclude, jitter)  # fail now, not in a worker

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        rng = np.random.default_rng([self.seed, index])
        num_objects = self.num_objects
        if self.two_object_fraction:  # drawn from its own stream: the one-object scenes stay those of fraction 0
            num_objects += int(np.random.default_rng([self.seed, index, 2]).random() < self.two_object_fraction)
        scene = sample_scene(rng, num_objects, self.exclude, self.jitter)
        order = rng.permutation(len(PHRASINGS))
        phrasings = [int(order[k % len(order)]) for k in range(self.captions_per_image)]
        if self.attribute_dropout:
            words = np.random.default_rng([self.seed, index, 1])
            captions = [partial_caption(scene, words, self.attribute_dropout, k) for k in phrasings]
        elif self.part_dropout:
            words = np.random.default_rng([self.seed, index, 1])
            captions = [part_caption(scene, words, self.part_dropout, k) for k in phrasings]
        else:
            captions = [caption(scene, phrasing=k) for k in phrasings]
        return {
            "image": render(scene, self.resolution),
            "caption": captions[0] if self.captions_per_image == 1 else captions,
            "scene": scene,
        }


def eval_prompts(n: int = 64, seed: int = 0, exclude=(), only=()) -> list[tuple[str, Scene]]:
    """A fixed, balanced list of single-object prompts for adherence evaluation.

    Scenes are picked greedily so that every attribute value is used about equally often
    (each pick is the candidate whose values have been used least so far, ties broken by a
    seeded shuffle), so all colours, shapes, sizes, positions and backgrounds are covered
    once ``n`` reaches 6. Phrasings rotate. ``only`` keeps the scenes that match one of its
    entries (the combinations a model was trained without), ``exclude`` drops them.
    """
    scenes = all_single_object_scenes(exclude, only)
    if not scenes:
        raise ValueError(f"exclude={list(exclude)!r}, only={list(only)!r} leave no scene to prompt for")
    random.Random(seed).shuffle(scenes)
    counts: dict[tuple[str, str], int] = {}

    def usage(scene: Scene) -> int:
        return sum(counts.get(item, 0) for item in _attribute_items(scene))

    prompts, pool = [], []
    for k in range(n):
        pool = pool or list(scenes)  # without repeats until every scene has been used
        scene = min(pool, key=usage)
        pool.remove(scene)
        for item in _attribute_items(scene):
            counts[item] = counts.get(item, 0) + 1
        prompts.append((caption(scene, phrasing=k % len(PHRASINGS)), scene))
    return prompts


def _attribute_items(scene: Scene) -> list[tuple[str, str]]:
    obj = scene.objects[0]
    return [("background", scene.background)] + [(a, getattr(obj, a)) for a in _ATTRIBUTES]


# ----------------------------------------------------------------------------- analyzer


def _as_pixels(image) -> np.ndarray:
    """Float HxWx3 array from a PIL image or an HxWx3 uint8 array; anything else is an error.

    Images larger than ANALYSIS_SIDE are box-downsampled by an integer factor first: every
    attribute is already certain at that size, and averaging also cancels pixel noise.
    """
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected a PIL image or an HxWx3 uint8 array, got {array.dtype} {array.shape}")
        image = Image.fromarray(array)
    factor = min(image.size) // ANALYSIS_SIDE
    image = image.convert("RGB")
    return np.asarray(image.reduce(factor) if factor > 1 else image, dtype=np.float32)


def _nearest(rgb: np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], np.float32) - rgb, axis=-1)
    return names[int(np.argmin(distances))]


def _background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """Majority vote of the border pixels over the three backgrounds, and their measured colour.

    A vote rather than a mean, because a large object may touch the border; the measured
    colour (not the palette's) is what distances are taken from, so a generated image with
    a slightly off background still separates cleanly.
    """
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    palette = np.asarray(list(BACKGROUNDS.values()), np.float32)
    votes = np.argmin(np.linalg.norm(border[:, None, :] - palette[None], axis=-1), axis=1)
    winner = int(np.bincount(votes, minlength=len(palette)).argmax())
    return list(BACKGROUNDS)[winner], np.median(border[votes == winner], axis=0)


def _window(box: tuple[slice, slice], pad: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape))


def _coverage(shape: str, cx: float, cy: float, r: float, window: tuple[slice, slice]) -> np.ndarray:
    """Anti-aliased template of a shape, rendered like ``render`` does, over a window of the image."""
    top, left = window[0].start, window[1].start
    height, width = window[0].stop - top, window[1].stop - left
    scale = _supersampling(max(height, width))
    canvas = Image.new("L", (width * scale, height * scale), 0)
    _draw(ImageDraw.Draw(canvas), shape, cx - left, cy - top, r, scale, 255)
    return np.asarray(canvas.reduce(scale) if scale > 1 else canvas, dtype=np.float32) / 255.0


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _object_color(pixels: np.ndarray, distance: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median of the component's most confident pixels: the anti-aliased rim would pull a mean toward the background."""
    inside = distance[mask]
    confident = mask & (distance >= 0.75 * np.percentile(inside, 95))
    return np.median(pixels[confident], axis=0)


def _analyze_object(pixels, distance, mask, box, background_rgb) -> dict:
    """Read one object from its connected component.

    The coverage of each pixel (alpha) is its projection onto the line from the background
    to the object's colour, so the object's area and centroid are measured to sub-pixel
    accuracy and are unchanged by blur. Each shape hypothesis turns that area into a
    bounding radius; the shape is the hypothesis whose template, drawn at the centroid with
    that radius, best overlaps the alpha map (soft IoU), and the size follows from its radius.
    """
    height, width = distance.shape
    side = math.sqrt(height * width)
    fg_rgb = _object_color(pixels, distance, mask)
    extent = max(s.stop - s.start for s in box)
    window = _window(box, extent // 2 + 3, (height, width))
    direction = fg_rgb - background_rgb
    alpha = (pixels[window] - background_rgb) @ direction / max(float(direction @ direction), 1e-6)
    alpha = np.clip(alpha, 0.0, 1.0) * ndimage.binary_dilation(mask[window], iterations=2)
    area = float(alpha.sum())
    ys, xs = np.mgrid[window] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    fit = {}
    for shape in SHAPES:
        r = math.sqrt(area / AREA_PER_RADIUS2[shape])
        template = _coverage(shape, cx, cy, r, window)
        iou = max(_soft_iou(alpha, ndimage.gaussian_filter(template, b) if b else template) for b in BLURS)
        fit[shape] = (iou, r)
    shape = max(fit, key=lambda s: fit[s][0])
    radius = fit[shape][1] / side
    return {
        "color": _nearest(fg_rgb, COLORS),
        "shape": shape,
        "size": min(SIZES, key=lambda s: abs(math.log(radius / SIZES[s]))),
        "position": min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], (cx / width, cy / height))),
    }


def analyze(image, num_objects: int = 1) -> dict:
    """Read background and objects back from an image (PIL or HxWx3 uint8, any resolution).

    Meant for generated images too, so nothing assumes exact palette colours or sharp
    edges: the background is voted from the border, the objects are the ``num_objects``
    largest connected components of pixels far from it (fewer if fewer are found).
    Returns ``{"background": str, "objects": [{"color", "shape", "size", "position"}, ...]}``.
    """
    pixels = _as_pixels(image)
    background, background_rgb = _background(pixels)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    labels, _ = ndimage.label(distance > FOREGROUND_DISTANCE)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    min_area = MIN_OBJECT_AREA * labels.size
    largest = [k for k in np.argsort(areas)[::-1][:num_objects] if areas[k] >= max(min_area, 1)]
    boxes = ndimage.find_objects(labels)
    objects = [_analyze_object(pixels, distance, labels == k, boxes[k - 1], background_rgb) for k in largest]
    return {"background": background, "objects": objects}


def _match_by_position(truth: Sequence[ShapeObject], found: list[dict]) -> list[dict | None]:
    """Pair each true object with the found object at its position, else with any left over."""
    remaining = list(found)
    matched: list[dict | None] = []
    for obj in truth:
        same = [f for f in remaining if f["position"] == obj.position]
        matched.append(same[0] if same else None)
        if same:
            remaining.remove(same[0])
    return [m if m is not None else (remaining.pop(0) if remaining else None) for m in matched]


def score(images, scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction right per attribute over all objects (background: over images), and "all":
    the fraction of images with every attribute of every object right. A missing object counts wrong."""
    images = list(images)
    if len(images) != len(scenes) or not images:
        raise ValueError(f"need as many images as scenes (and at least one), got {len(images)} and {len(scenes)}")
    right = {a: 0 for a in _ATTRIBUTES}
    total_objects, backgrounds, perfect = 0, 0, 0
    for image, scene in zip(images, scenes):
        result = analyze(image, num_objects=len(scene.objects))
        background_ok = result["background"] == scene.background
        backgrounds += background_ok
        all_ok = background_ok
        for obj, found in zip(scene.objects, _match_by_position(scene.objects, result["objects"])):
            for attribute in _ATTRIBUTES:
                ok = found is not None and found[attribute] == getattr(obj, attribute)
                right[attribute] += ok
                all_ok &= ok
        total_objects += len(scene.objects)
        perfect += all_ok
    accuracy = {a: right[a] / total_objects for a in _ATTRIBUTES}
    accuracy["background"] = backgrounds / len(images)
    accuracy["all"] = perfect / len(images)
    return accuracy
