"""The embedded ``shapes`` dataset: determinism, vocabulary, exclusion, captions, and the analyzer."""

import math
import random
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage

from ldm.data.shapes import (
    BACKGROUNDS,
    COLORS,
    MIN_GAP,
    PHRASINGS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    all_single_object_scenes,
    analyze,
    caption,
    composed_caption,
    eval_prompts,
    parse_caption,
    render,
    sample_scene,
    score,
)

PURPLE_STAR = {"color": "purple", "shape": "star"}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def without_jitter(scene: Scene) -> Scene:
    """What a caption can carry: everything but the jitter."""
    return Scene(scene.background, tuple(ShapeObject(o.shape, o.color, o.size, o.position) for o in scene.objects))


def degrade(image: Image.Image, rng: np.random.Generator, blur: float = 0.7, sigma: float = 8.0) -> np.ndarray:
    """A stand-in for a generated image: slightly blurred, with Gaussian noise (sigma in 0..255 units)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    return np.clip(np.round(blurred + rng.normal(0.0, sigma, blurred.shape)), 0, 255).astype(np.uint8)


def report(name: str, accuracy: dict) -> None:
    print(f"\n{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))


# ------------------------------------------------------------------------ vocabulary


def test_vocabulary_is_the_documented_one():
    assert COLORS == {
        "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
        "yellow": (240, 210, 40), "purple": (140, 60, 200), "orange": (245, 130, 30),
    }  # fmt: skip
    assert BACKGROUNDS == {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
    assert SHAPES == ("circle", "square", "triangle", "star")
    assert SIZES == {"small": 0.10, "large": 0.22}
    assert POSITIONS == {
        "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5),
    }  # fmt: skip
    assert len(all_single_object_scenes()) == 6 * 4 * 2 * 5 * 3


def test_every_value_appears_and_captions_describe_the_image():
    dataset = ShapesDataset(size=300, resolution=32)
    seen = Counter()
    for i in range(len(dataset)):
        item = dataset[i]
        scene = item["scene"]
        assert item["image"].mode == "RGB" and item["image"].size == (32, 32)
        assert parse_caption(item["caption"]) == without_jitter(scene)
        seen.update([("background", scene.background)])
        seen.update((a, getattr(scene.objects[0], a)) for a in ("color", "shape", "size", "position"))
    for attribute, values in [
        ("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS), ("background", BACKGROUNDS),
    ]:  # fmt: skip
        assert {v for a, v in seen if a == attribute} == set(values), attribute


def test_rendered_colours_match_the_palette_at_object_centre_and_corners():
    for scene in all_single_object_scenes():
        image = pixels(render(scene, 64))
        x, y = POSITIONS[scene.objects[0].position]
        assert tuple(image[int(y * 64), int(x * 64)]) == COLORS[scene.objects[0].color], scene
        for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
            assert tuple(corner) == BACKGROUNDS[scene.background], scene


def test_rendering_is_anti_aliased_and_to_scale():
    scene = Scene("black", (ShapeObject("circle", "red", "large", "center"),))
    image = pixels(render(scene, 256)).astype(np.float32)
    coverage = (image[..., 0] - 20.0) / (220.0 - 20.0)
    assert len(np.unique(image[..., 0])) > 10  # edge pixels are blends, not a hard cut
    radius = math.sqrt(coverage.sum() / math.pi) / 256
    assert radius == pytest.approx(SIZES["large"], rel=0.01)
    ys, xs = np.mgrid[:256, :256] + 0.5
    assert (coverage * xs).sum() / coverage.sum() == pytest.approx(128.0, abs=0.2)
    assert (coverage * ys).sum() / coverage.sum() == pytest.approx(128.0, abs=0.2)


def test_any_resolution():
    scene = Scene("white", (ShapeObject("star", "blue", "small", "top"),))
    for resolution in (8, 32, 100, 1024):
        image = render(scene, resolution)
        assert image.size == (resolution, resolution) and image.mode == "RGB"


# ----------------------------------------------------------------------- determinism


def test_same_seed_same_item_different_seed_different_item():
    first, again, other = (ShapesDataset(size=50, resolution=32, seed=s) for s in (0, 0, 1))
    for i in (0, 7, 49):
        assert np.array_equal(pixels(first[i]["image"]), pixels(again[i]["image"]))
        assert first[i]["caption"] == again[i]["caption"] and first[i]["scene"] == again[i]["scene"]
    assert first[7]["scene"] == ShapesDataset(size=50, resolution=32, seed=0)[7]["scene"]  # order does not matter
    differing = sum(first[i]["scene"] != other[i]["scene"] for i in range(50))
    assert differing >= 45
    assert first[0]["scene"] != first[1]["scene"]


def test_sample_scene_accepts_both_kinds_of_generator():
    for make in (random.Random, np.random.default_rng):
        assert sample_scene(make(3), num_objects=2) == sample_scene(make(3), num_objects=2)


def test_dataset_bounds_and_bad_arguments():
    dataset = ShapesDataset(size=3, resolution=16)
    assert len(dataset) == 3
    with pytest.raises(IndexError):
        dataset[3]
    with pytest.raises(ValueError, match="jitter"):
        ShapesDataset(jitter=0.1)
    with pytest.raises(ValueError, match="num_objects"):
        ShapesDataset(num_objects=3)
    with pytest.raises(ValueError, match="colour|color"):
        ShapesDataset(exclude=[{"colour": "purple"}])
    with pytest.raises(ValueError, match="pink"):
        ShapesDataset(exclude=[{"color": "pink"}])
    with pytest.raises(ValueError, match="hexagon"):
        ShapeObject("hexagon", "red", "small", "left")


def test_several_captions_per_image_use_different_phrasings():
    item = ShapesDataset(size=5, captions_per_image=3)[2]
    assert isinstance(item["caption"], list) and len(set(item["caption"])) == 3
    assert all(parse_caption(text) == without_jitter(item["scene"]) for text in item["caption"])


def test_attribute_dropout_leaves_words_out_and_says_only_what_is_true():
    full = ShapesDataset(size=300, resolution=8)
    partial = ShapesDataset(size=300, resolution=8, attribute_dropout=0.3)
    said = {a: 0 for a in ("size", "color", "shape", "position", "background")}
    for i in range(300):
        item, text = full[i], partial[i]["caption"]
        assert partial[i]["scene"] == item["scene"]  # the images are those of the full captions
        obj, scene = item["scene"].objects[0], item["scene"]
        words = set(text.replace(",", " ").split())
        said["size"] += obj.size in words
        said["color"] += obj.color in words
        said["shape"] += obj.shape in words
        said["position"] += POSITION_PHRASES[obj.position] in text
        said["background"] += scene.background in text
        other = [w for w in (*COLORS, *SHAPES, *SIZES, *BACKGROUNDS) if w not in (obj.color, obj.shape, obj.size, scene.background)]
        assert not words & set(other), text  # never a wrong attribute
        assert text.startswith(("a ", "an ")) or scene.background in text
    assert all(150 <= n <= 270 for n in said.values()), said  # each kept about 70% of the time, independently
    assert not any(" shape" in full[i]["caption"] for i in range(300))
    assert "an orange shape" == caption(Scene("gray", (ShapeObject("star", "orange", "small", "left"),)),
                                        omit={"size", "shape", "position", "background"})


def test_part_dropout_says_the_objects_or_the_background_alone_and_composes_back():
    full = ShapesDataset(size=300, resolution=8)
    parts = ShapesDataset(size=300, resolution=8, part_dropout=0.4)
    objects_only = background_only = 0
    for i in range(300):
        text, scene = parts[i]["caption"], full[i]["scene"]
        assert parts[i]["scene"] == scene
        if text == full[i]["caption"]:
            continue
        obj = scene.objects[0]
        objects_only += text == caption(scene, omit={"background"})
        background_only += scene.background in text and not {obj.color, obj.shape, obj.size} & set(text.split())
    assert 40 <= objects_only <= 80 and 40 <= background_only <= 80, (objects_only, background_only)
    assert objects_only + background_only == sum(parts[i]["caption"] != full[i]["caption"] for i in range(300))
    with pytest.raises(ValueError, match="part_dropout"):
        ShapesDataset(part_dropout=0.2, attribute_dropout=0.2)
    # the composed prompt of a caption is its two parts, each in the phrasing the caption has
    text = "on a black background, a small green square at the top"
    assert composed_caption(text) == "a small green square at the top AND on a black background, a shape"
    assert parse_caption(composed_caption(text).split(" AND ")[1].replace("a shape", "a small green square at the top")) \
        == parse_caption(text)


def test_two_object_fraction_mixes_scenes_and_keeps_the_single_ones():
    single = ShapesDataset(size=200, resolution=8)
    mixed = ShapesDataset(size=200, resolution=8, two_object_fraction=0.5)
    counts = [len(mixed[i]["scene"].objects) for i in range(200)]
    assert 70 <= counts.count(2) <= 130
    assert all(mixed[i]["scene"] == single[i]["scene"] for i in range(200) if counts[i] == 1)
    assert all(" and " in mixed[i]["caption"] for i in range(200) if counts[i] == 2)
    with pytest.raises(ValueError, match="two_object_fraction"):
        ShapesDataset(num_objects=2, two_object_fraction=0.5)
    with pytest.raises(ValueError, match="attribute_dropout"):
        ShapesDataset(attribute_dropout=1.0)


def test_generation_is_fast():
    dataset = ShapesDataset(size=200, resolution=64)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    per_item = (time.perf_counter() - start) / len(dataset)
    assert per_item < 0.005, f"{per_item * 1e3:.2f} ms per 64 px item"


# ------------------------------------------------------------------------- exclusion


def test_excluded_combinations_never_appear_and_the_rest_still_do():
    for num_objects in (1, 2):
        dataset = ShapesDataset(size=600, resolution=8, num_objects=num_objects, exclude=[PURPLE_STAR])
        objects = [o for i in range(len(dataset)) for o in dataset[i]["scene"].objects]
        assert not any(o.color == "purple" and o.shape == "star" for o in objects)
        assert any(o.color == "purple" for o in objects) and any(o.shape == "star" for o in objects)
    remaining = all_single_object_scenes(exclude=[PURPLE_STAR, {"background": "gray", "size": "small"}])
    assert len(remaining) == 720 - 30 - 120 + 5  # the two entries share the 5 gray small purple stars


def test_excluding_everything_is_an_error():
    with pytest.raises(ValueError, match="exclude"):
        sample_scene(random.Random(0), exclude=[{"size": "small"}, {"size": "large"}])


# -------------------------------------------------------------------------- captions


def test_captions_round_trip_through_every_phrasing():
    assert len(PHRASINGS) >= 4
    rng = random.Random(0)
    scenes = all_single_object_scenes() + [sample_scene(rng, num_objects=2) for _ in range(100)]
    for scene in scenes:
        texts = {caption(scene, phrasing=p) for p in range(len(PHRASINGS))}
        assert len(texts) == len(PHRASINGS)
        for text in texts:
            assert parse_caption(text) == without_jitter(scene), text
    assert parse_caption("  A Large RED circle on the left, on a gray background. ").objects[0].color == "red"


def test_caption_reads_naturally():
    scene = Scene("gray", (ShapeObject("circle", "red", "large", "left"),))
    assert caption(scene) == "a large red circle on the left, on a gray background"
    star, square = ShapeObject("star", "blue", "small", "top"), ShapeObject("square", "green", "small", "bottom")
    two = Scene("black", (star, square))
    assert " and " in caption(two, phrasing=1)
    every_phrasing = {caption(scene, phrasing=p) for p in range(len(PHRASINGS))}
    assert {caption(scene, rng=random.Random(s)) for s in range(40)} == every_phrasing


@pytest.mark.parametrize(
    "text",
    ["", "a red circle", "a large pink circle on the left, on a gray background", "a large red circle on the left"],
)
def test_parse_caption_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError):
        parse_caption(text)


# ----------------------------------------------------------------------- two objects


def test_two_object_scenes_have_distinct_positions_and_never_touch():
    dataset = ShapesDataset(size=300, resolution=64, num_objects=2)
    for i in range(len(dataset)):
        item = dataset[i]
        a, b = item["scene"].objects
        assert a.position != b.position
        (ax, ay), (bx, by) = a.center(), b.center()
        assert math.hypot(ax - bx, ay - by) - SIZES[a.size] - SIZES[b.size] >= MIN_GAP
        image = pixels(item["image"]).astype(np.float32)
        foreground = np.linalg.norm(image - BACKGROUNDS[item["scene"].background], axis=-1) > 0
        assert ndimage.label(foreground)[1] == 2, item["caption"]


# -------------------------------------------------------------------------- analyzer


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_analyzer_reads_every_single_object_scene(resolution):
    scenes = all_single_object_scenes()
    accuracy = score([render(s, resolution) for s in scenes], scenes)
    report(f"analyzer, {resolution} px, clean", accuracy)
    if resolution == 32:
        assert min(accuracy[a] for a in ("color", "position", "background")) >= 0.99
        assert min(accuracy[a] for a in ("shape", "size")) >= 0.95
    else:
        assert accuracy["all"] == 1.0


def test_analyzer_is_robust_to_noise_and_blur():
    rng = np.random.default_rng(0)
    scene_rng = random.Random(0)
    scenes = [sample_scene(scene_rng) for _ in range(720)]  # jittered, so edges fall anywhere in a pixel
    accuracy = score([degrade(render(s, 64), rng) for s in scenes], scenes)
    report("analyzer, 64 px, blur 0.7 px + noise 8/255", accuracy)
    assert min(accuracy.values()) >= 0.95


def test_analyzer_reads_two_object_scenes():
    rng = random.Random(0)
    scenes = [sample_scene(rng, num_objects=2) for _ in range(200)]
    accuracy = score([render(s, 64) for s in scenes], scenes)
    report("analyzer, 64 px, two objects", accuracy)
    assert accuracy["all"] >= 0.99


def test_analyzer_takes_arrays_and_refuses_other_input():
    scene = Scene("white", (ShapeObject("triangle", "orange", "large", "bottom"),))
    image = render(scene, 48)
    found = {"color": "orange", "shape": "triangle", "size": "large", "position": "bottom"}
    expected = {"background": "white", "objects": [found]}
    assert analyze(image) == analyze(pixels(image)) == expected
    with pytest.raises(ValueError, match="uint8"):
        analyze(pixels(image).astype(np.float32) / 255)


def test_score_counts_wrong_and_missing_objects():
    scene = Scene("gray", (ShapeObject("square", "red", "small", "right"),))
    recoloured = Scene("gray", (ShapeObject("square", "blue", "small", "right"),))
    accuracy = score([render(scene, 64)], [recoloured])
    assert accuracy == {"shape": 1.0, "color": 0.0, "size": 1.0, "position": 1.0, "background": 1.0, "all": 0.0}
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["gray"])
    assert score([blank], [scene])["shape"] == 0.0
    assert analyze(blank) == {"background": "gray", "objects": []}


# ---------------------------------------------------------------------- eval prompts


def test_eval_prompts_are_fixed_balanced_and_parseable():
    prompts = eval_prompts(64)
    assert prompts == eval_prompts(64) and len(prompts) == 64
    assert len({scene for _, scene in prompts}) == 64
    for attribute, values in [("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)]:
        counts = Counter(getattr(scene.objects[0], attribute) for _, scene in prompts)
        assert set(counts) == set(values) and max(counts.values()) - min(counts.values()) <= 1, (attribute, counts)
    counts = Counter(scene.background for _, scene in prompts)
    assert set(counts) == set(BACKGROUNDS) and max(counts.values()) - min(counts.values()) <= 1
    assert all(parse_caption(text) == scene for text, scene in prompts)
    held_out = eval_prompts(64, exclude=[PURPLE_STAR])
    assert not any(s.objects[0].color == "purple" and s.objects[0].shape == "star" for _, s in held_out)


def test_eval_prompts_only_the_held_out_combinations():
    """`only` asks for the combinations a model was trained without; balanced over the rest."""
    triangle_left = {"shape": "triangle", "position": "left"}
    prompts = eval_prompts(36, only=[triangle_left])
    scenes = [scene.objects[0] for _, scene in prompts]
    assert all(o.shape == "triangle" and o.position == "left" for o in scenes)
    assert len(set(scenes)) == 12  # 6 colours x 2 sizes, each on the 3 backgrounds: every one of the 36 scenes
    assert len({scene for _, scene in prompts}) == 36
    assert Counter(o.color for o in scenes) == {c: 6 for c in COLORS}
    assert all(parse_caption(text) == scene for text, scene in prompts)
    with pytest.raises(ValueError, match="only"):
        eval_prompts(4, exclude=[triangle_left], only=[triangle_left])
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        eval_prompts(4, only=[{"colour": "red"}])
