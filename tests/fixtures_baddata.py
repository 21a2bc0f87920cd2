"""A folder of every kind of bad (and odd) input a user's image folder can hold, built in tmp_path.

`write_bad_folder(root, captions)` writes the same images with their captions given as
sidecar .txt files, a metadata.jsonl ("text" column) or a metadata.csv ("caption" column,
the fallback name). `expected_counts(...)` is what the data check must report for it.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 24          # px: ordinary fixture images are SIDE x SIDE, above the test resolution
RESOLUTION = 16    # px: the transform resolution the tests use
TINY = 8           # px: side of the too-small image
MAX_PIXELS = 1600  # the tests' max_pixels; the bomb has 64 x 64 = 4096
LATIN1_CAPTION = "café crème".encode("latin-1")


def png(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


def jpeg(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **params)
    return buf.getvalue()


def noise_rgb(w: int = SIDE, h: int = SIDE, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def half_transparent(mode: str) -> Image.Image:
    """Left half fully transparent black, right half opaque; composited on white -> white left."""
    img = Image.new(mode, (SIDE, SIDE))
    opaque = (0, 0, 200, 255) if mode == "RGBA" else (60, 255)
    img.paste(opaque, (SIDE // 2, 0, SIDE, SIDE))
    return img


def palette_transparent() -> Image.Image:
    """Palette image: index 0 (black, transparent) on the left, index 1 (green) on the right."""
    img = Image.new("P", (SIDE, SIDE), 0)
    img.putpalette([0, 0, 0, 0, 160, 0] + [0, 0, 0] * 254)
    img.paste(1, (SIDE // 2, 0, SIDE, SIDE))
    return img


def sixteen_bit() -> Image.Image:
    """16-bit gray: columns 0, 128*257 and 65535, which must map to 0, 128 and 255."""
    row = np.array([0, 128 * 257, 65535] * (SIDE // 3), dtype=np.uint16)
    return Image.fromarray(np.tile(row, (SIDE, 1)))


def exif_rotated() -> bytes:
    """Stored 32x24, red left / blue right, EXIF orientation 6: upright it is 24x32, red on top."""
    img = Image.new("RGB", (32, 24), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(img, exif=exif.tobytes())


# file name -> (file bytes, caption bytes or None for no caption at all)
def bad_files() -> dict[str, tuple[bytes, bytes | None]]:
    good = png(noise_rgb())
    return {
        "good.png": (good, b"a good image"),
        "truncated.jpg": (jpeg(noise_rgb(seed=1))[:400], b"cut short"),
        "truncated_b.png": (good[: len(good) // 2], b"cut short too"),
        "random.png": (np.random.default_rng(2).bytes(300), b"noise bytes"),
        "rgba.png": (png(half_transparent("RGBA")), b"rgba"),
        "la.png": (png(half_transparent("LA")), b"gray with alpha"),
        "cmyk.jpg": (jpeg(Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0))), b"cmyk red"),
        "gray16.png": (png(sixteen_bit()), b"sixteen bits"),
        "palette.png": (png(palette_transparent(), transparency=0), b"palette"),
        "gray.png": (png(noise_rgb().convert("L")), b"gray"),
        "exif.jpg": (exif_rotated(), b"turned"),
        "tiny.png": (png(noise_rgb(TINY, TINY)), b"tiny"),
        "bomb.png": (png(Image.new("RGB", (64, 64), (9, 9, 9))), b"too many pixels"),
        "nocap.png": (png(noise_rgb(seed=3)), None),
        "empty.png": (png(noise_rgb(seed=4)), b"  \n"),
        "latin1.png": (png(noise_rgb(seed=5)), LATIN1_CAPTION),
    }


ORPHAN = "notes.txt"  # a caption file with no image
MISSING = "gone.png"  # listed in the metadata, not on disk


def write_bad_folder(root: Path, captions: str = "sidecar") -> Path:
    """Write the fixture; captions: "sidecar" | "jsonl" | "csv".

    With metadata, the non-UTF-8 caption stays a sidecar file (a metadata file is text) and
    so exercises the sidecar fallback; `nocap.png` is not listed; `gone.png` is listed but
    absent; good.png has two captions in the jsonl.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / ORPHAN).write_text("a caption without its image")
    rows = []
    for name, (data, caption) in bad_files().items():
        (root / name).write_bytes(data)
        if caption is None:
            continue
        if captions == "sidecar" or name == "latin1.png":
            (root / name).with_suffix(".txt").write_bytes(caption)
        else:
            rows.append({"file_name": name, "text": caption.decode()})
    if captions == "sidecar":
        return root
    rows.append({"file_name": MISSING, "text": "listed, never written"})
    if captions == "jsonl":
        rows[0]["text"] = [rows[0]["text"], "a fine image"]
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["file_name", "caption"])
            writer.writeheader()
            writer.writerows({"file_name": r["file_name"], "caption": r["text"]} for r in rows)
    return root


def expected_counts(small_policy: str = "skip", metadata: bool = False) -> dict[str, int]:
    """The data check's counts for `write_bad_folder` at RESOLUTION, MAX_PIXELS, no_caption=keep."""
    counts = {
        "ok": 11, "truncated": 2, "not_an_image": 1, "orphan_caption": 1, "decompression_bomb": 1,
        "converted_rgba": 1, "converted_la": 1, "converted_cmyk": 1, "converted_16bit": 1,
        "converted_palette": 1, "converted_grayscale": 1, "exif_rotated": 1,
        "missing_caption": 1, "empty_caption": 1, "non_utf8_caption": 1,
    }
    if small_policy == "skip":
        counts["too_small_skipped"] = 1
    else:
        counts.update(ok=12, too_small_upscaled=1)
    if metadata:
        counts["unreadable"] = 1
    return counts


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
