"""Class labels of a latent cache's records: what class-conditional U-Nets and noise-aware
classifiers train on (issue #22).

A label is a pure function of what a cache record already holds, so no cache needs re-encoding
and the cache format is unchanged:

    shapes:<attribute>   the synthetic shapes' attribute of the scene's (one) object, read back
                         from the caption (ldm.data.shapes.parse_caption): shapes:shape gives 4
                         classes (circle, square, triangle, star), shapes:color, shapes:size,
                         shapes:position; shapes:background reads the scene's background
    folder               an imagefolder's first subfolder: the record id `star/003.png` is class
                         "star"; the classes are the subfolders found in the cache, sorted

The class names (in label order) travel with what is trained on them: the pipeline's ldm.json
(`classes`) and the classifier's classifier.json. A class-conditional U-Net has one more class
embedding than classes: the last, `null_label(names)`, is the "no class" of label dropout and the
unconditional branch of classifier-free guidance over classes.
"""

from __future__ import annotations

import torch

from ldm.data import shapes

SHAPES_ATTRIBUTES = ("shape", "color", "size", "position", "background")


def label_spec_problem(spec: str) -> str | None:
    """Why `spec` is not a labels setting, or None."""
    if spec == "folder":
        return None
    kind, _, attribute = spec.partition(":")
    if kind == "shapes" and attribute in SHAPES_ATTRIBUTES:
        return None
    return (f"labels {spec!r} is not one of: folder, " + ", ".join(f"shapes:{a}" for a in SHAPES_ATTRIBUTES))


def _shapes_label(spec: str, caption: str) -> str:
    attribute = spec.partition(":")[2]
    scene = shapes.parse_caption(caption)
    if attribute == "background":
        return scene.background
    if len(scene.objects) != 1:
        raise ValueError(f"labels {spec!r} need one object per image; {caption!r} has {len(scene.objects)} "
                         "(encode shapes with data.source.num_objects=1)")
    return getattr(scene.objects[0], attribute)


def _folder_label(record_id: str) -> str:
    parts = record_id.replace("\\", "/").split("/")
    if len(parts) < 2:
        raise ValueError(f"labels 'folder' need images in class subfolders (class/image.png); record {record_id!r} "
                         "is at the top of the folder")
    return parts[0]


def record_names(spec: str, captions: list[list[str]], ids: list[str]) -> list[str]:
    """The class name of every record (its first caption for shapes, its id for folder)."""
    problem = label_spec_problem(spec)
    if problem:
        raise ValueError(problem)
    if spec == "folder":
        return [_folder_label(i) for i in ids]
    return [_shapes_label(spec, c[0]) for c in captions]


def class_names(spec: str, found: list[str] | None = None) -> list[str]:
    """The classes of `spec`, in label order: a shapes attribute's vocabulary (fixed, so two caches
    of shapes agree), or the sorted folder names `found`."""
    if spec.startswith("shapes:"):
        return list(shapes._VOCABULARY[spec.partition(":")[2]])
    return sorted(set(found or []))


def cache_labels(cache, spec: str, names: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """(class names, int64 label per record) of a LatentCache split. Pass the training split's `names`
    when labelling the held-out split, so both use one numbering; a class it lacks is an error."""
    per_record = record_names(spec, cache.captions, cache.ids)
    names = names if names is not None else class_names(spec, per_record)
    index = {n: k for k, n in enumerate(names)}
    unknown = sorted(set(per_record) - set(index))
    if unknown:
        raise ValueError(f"records of classes {unknown} that the training classes {names} lack")
    return names, torch.tensor([index[n] for n in per_record], dtype=torch.long)


def null_label(names: list[str]) -> int:
    """The label index of "no class" (label dropout, the unconditional branch of guidance)."""
    return len(names)


def label_indices(names: list[str], wanted: list[str]) -> torch.Tensor:
    """Class names -> int64 labels; an unknown name is an error listing the known ones."""
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(f"unknown class {unknown[0]!r}; this model knows: {', '.join(names)}")
    return torch.tensor([names.index(w) for w in wanted], dtype=torch.long)
