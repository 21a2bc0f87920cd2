"""Prepare a real captioned dataset from what the package registries ship, in one command.

    python -m ldm.data.prepare emoji data/emoji-64 --size 64

writes an imagefolder that every stage reads as it is (`source.kind: imagefolder`):

    OUT/images/<group>/<code points>.png   one image per emoji, RGB on white, size x size px
    OUT/metadata.jsonl                     file_name, text (caption alternatives; the first is the
                                           full one), name, group, subgroup, code points
    OUT/heldout.txt                        the held-out split: file names, one a line
    OUT/card.json, OUT/README.md           source, licences, versions, counts per group and split

`emoji`: every fully-qualified emoji of Unicode's emoji-test.txt (Debian `unicode-data`) that
Google's Noto Color Emoji (Debian `fonts-noto-color-emoji`) draws as one glyph: faces, people
with their skin tones, animals, plants, food, places, vehicles, objects, symbols and flags,
drawn in one consistent style nobody here made. Captions are real words: the CLDR short name
("thumbs up: medium skin tone") and CLDR's English keywords (Debian `unicode-cldr-core`), e.g.
"thumbs up: medium skin tone, hand, thumb, up, +1".

The held-out split is fixed by a hash of each file name (`ldm.data.split.heldout_by_count`), so
`data.eval_size=N` with the same N picks exactly the files of heldout.txt, and it draws from
every group in proportion, where "the last N files" would all be flags.

What it needs is installed with the system's package manager when it can be (apt-get, as root);
when it cannot, the error names what is missing and how to get it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ldm.data.split import SPLIT_RULE, heldout_by_count

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR_ANNOTATIONS = (Path("/usr/share/unicode/cldr/common/annotations/en.xml"),
                    Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml"))
DEBIAN_PACKAGES = {"NotoColorEmoji.ttf": "fonts-noto-color-emoji", "emoji-test.txt": "unicode-data",
                   "en.xml": "unicode-cldr-core"}  # by file name: the package that ships it
NOTO_STRIKE = 109      # px: the one size of Noto Color Emoji's bitmaps (136 x 128 glyphs)
MAX_KEYWORDS = 5       # CLDR keywords appended to the name in the full caption (a CLIP sees 32 tokens)
DEFAULT_HELDOUT = 400  # held-out images: retrieval among 200 captions and FID on 200 need >= 200


class PrepareError(RuntimeError):
    """Something the preparation needs is missing; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class Emoji:
    sequence: str          # the characters, variation selectors included
    name: str              # CLDR short name, e.g. "thumbs up: medium skin tone"
    group: str             # e.g. "People & Body"
    subgroup: str          # e.g. "hand-fingers-closed"
    keywords: tuple[str, ...] = ()

    @property
    def code_points(self) -> str:
        return "-".join(f"{ord(c):04x}" for c in self.sequence)

    @property
    def file_name(self) -> str:
        return f"images/{slug(self.group)}/{self.code_points}.png"

    def captions(self) -> list[str]:
        """The full caption first (name and keywords), then the name alone: two phrasings."""
        extra = [k for k in self.keywords if k.lower() not in self.name.lower()][:MAX_KEYWORDS]
        full = ", ".join([self.name, *extra])
        return [full, self.name] if extra else [self.name]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------- what it needs


def ensure_files(paths, install: bool = True) -> None:
    """Install the Debian packages that provide `paths` when some are missing and we can (root
    and apt-get); else raise a PrepareError naming what is missing and how to get it."""
    missing = [p for p in paths if not Path(p).is_file()]
    if not missing:
        return
    packages = sorted({DEBIAN_PACKAGES[Path(p).name] for p in missing if Path(p).name in DEBIAN_PACKAGES})
    can_install = install and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0
    if can_install and packages:
        print(f"installing {' '.join(packages)} with apt-get", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        if subprocess.run(command, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(command, env=env, capture_output=True)
    still = [p for p in paths if not Path(p).is_file()]
    if still:
        raise PrepareError(
            "missing: " + ", ".join(map(str, still)) + ".\n"
            f"On Debian or Ubuntu: sudo apt-get install {' '.join(packages or DEBIAN_PACKAGES.values())}\n"
            "Elsewhere, get Noto Color Emoji (NotoColorEmoji.ttf), Unicode's emoji-test.txt and CLDR's "
            "annotations/en.xml and annotationsDerived/en.xml, and pass them with --font, --emoji-test "
            "and --annotations")


# ----------------------------------------------------------------------------- reading the data


def read_emoji_test(path: Path) -> list[Emoji]:
    """Fully-qualified emoji of emoji-test.txt with their group, subgroup and CLDR name."""
    group = subgroup = ""
    found = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group != "Component":  # components: skin-tone swatches alone
            codes, rest = line.split(";", 1)
            name = rest.split("#", 1)[1].split(maxsplit=2)[2].strip()  # "# 👍 E0.6 thumbs up"
            found.append(Emoji("".join(chr(int(c, 16)) for c in codes.split()), name, group, subgroup))
    if not found:
        raise PrepareError(f"{path}: no fully-qualified emoji found; is it Unicode's emoji-test.txt?")
    return found


def read_keywords(paths) -> dict[str, tuple[str, ...]]:
    """{emoji without variation selectors: CLDR keywords} from CLDR annotation files."""
    keywords: dict[str, tuple[str, ...]] = {}
    for path in paths:
        for node in ET.parse(path).getroot().iter("annotation"):
            if node.get("type") != "tts" and node.text:
                keywords[node.get("cp").replace("\ufe0f", "")] = tuple(k.strip() for k in node.text.split("|") if k.strip())
    return keywords


# ----------------------------------------------------------------------------- drawing


class EmojiRenderer:
    """Draws one emoji sequence as a size x size RGB image on white, centred, its bitmap scaled
    down with a Lanczos filter; None where the font has no single glyph for the sequence."""

    def __init__(self, font_path: Path, size: int):
        from PIL import features

        if not features.check("raqm"):  # without text shaping, sequences (ZWJ, flags, skin tones) fall apart
            raise PrepareError("Pillow was built without libraqm, which emoji sequences need; "
                               "install a Pillow wheel from PyPI (pip install --force-reinstall pillow)")
        self.font = ImageFont.truetype(str(font_path), NOTO_STRIKE, layout_engine=ImageFont.Layout.RAQM)
        self.size = size
        self.glyph_width = self.font.getlength("\U0001F600")  # one glyph's advance

    def __call__(self, sequence: str) -> Image.Image | None:
        if self.font.getlength(sequence) > 1.2 * self.glyph_width:  # drawn as several glyphs
            return None
        canvas = Image.new("RGBA", (200, 200), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((100, 100), sequence, font=self.font, embedded_color=True, anchor="mm")
        box = canvas.getbbox()
        if box is None:
            return None
        glyph = canvas.crop(box)
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.LANCZOS)
        white = Image.new("RGBA", square.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, square).convert("RGB")


# ----------------------------------------------------------------------------- the dataset


def prepare_emoji(out: Path, size: int = 64, heldout: int = DEFAULT_HELDOUT, font: Path = EMOJI_FONT,
                  emoji_test: Path = EMOJI_TEST, annotations=CLDR_ANNOTATIONS, install: bool = True,
                  limit: int = 0) -> dict:
    """Write the emoji imagefolder to `out` (see the module docstring); returns its card.

    `limit` keeps every k-th emoji so that about `limit` remain (0: all), for quick tests.
    """
    ensure_files([font, emoji_test, *annotations], install)
    emoji = read_emoji_test(emoji_test)
    keywords = read_keywords(annotations)
    emoji = [dataclasses.replace(e, keywords=keywords.get(e.sequence.replace("\ufe0f", ""), ())) for e in emoji]
    if limit:
        emoji = emoji[:: max(1, len(emoji) // limit)][:limit]
    render = EmojiRenderer(font, size)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows, skipped = [], Counter()
    for e in tqdm(emoji, desc=f"draw emoji at {size} px"):
        image = render(e.sequence)
        if image is None:
            skipped[e.group] += 1
            continue
        path = tmp / e.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, optimize=True)
        rows.append({"file_name": e.file_name, "text": e.captions(), "name": e.name, "group": e.group,
                     "subgroup": e.subgroup, "code_points": e.code_points})
    if len(rows) <= heldout:
        raise PrepareError(f"only {len(rows)} emoji could be drawn, not more than the {heldout} to hold out")
    held = heldout_by_count([r["file_name"] for r in rows], heldout)
    with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp / "heldout.txt").write_text("".join(f"{name}\n" for name in sorted(held)))
    card = emoji_card(rows, held, skipped, size, font, emoji_test)
    (tmp / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False))
    (tmp / "README.md").write_text(card_markdown(card))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # important: a half-written folder never has the final name
    return card


def _package_version(package: str) -> str | None:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return result.stdout.strip() or None


def emoji_card(rows: list[dict], held: set[str], skipped: Counter, size: int, font: Path, emoji_test: Path) -> dict:
    groups = Counter(r["group"] for r in rows)
    held_groups = Counter(r["group"] for r in rows if r["file_name"] in held)
    return {
        "name": "emoji",
        "description": "Unicode emoji drawn by Noto Color Emoji, captioned with CLDR names and keywords",
        "size": size,
        "images": len(rows),
        "train": len(rows) - len(held),
        "heldout": len(held),
        "split": {"rule": SPLIT_RULE, "key": "file_name", "eval_size": len(held), "file": "heldout.txt"},
        "groups": {g: {"images": n, "heldout": held_groups[g]} for g, n in groups.most_common()},
        "not_drawn": dict(skipped),  # sequences the font draws as several glyphs
        "sources": {
            "images": {"what": "Noto Color Emoji", "file": str(font), "package": "fonts-noto-color-emoji",
                       "version": _package_version("fonts-noto-color-emoji"), "licence": "SIL Open Font License 1.1"},
            "names": {"what": "Unicode emoji-test.txt", "file": str(emoji_test), "package": "unicode-data",
                      "version": _package_version("unicode-data"), "licence": "Unicode License v3"},
            "keywords": {"what": "CLDR English annotations", "package": "unicode-cldr-core",
                         "version": _package_version("unicode-cldr-core"), "licence": "Unicode License v3"},
        },
        "columns": {"file_name": "image path", "text": "captions: [full (name + keywords), name]",
                    "name": "CLDR short name", "group": "emoji group", "subgroup": "emoji subgroup",
                    "code_points": "hex code points, '-'-joined"},
    }


def card_markdown(card: dict) -> str:
    lines = [f"# emoji, {card['size']} px", "", card["description"] + ".", "",
             f"{card['images']} images: {card['train']} for training, {card['heldout']} held out "
             f"(heldout.txt; rule {card['split']['rule']} on the file name, so `data.eval_size={card['heldout']}` "
             "selects the same files).", "", "| group | images | held out |", "|---|---|---|"]
    lines += [f"| {g} | {v['images']} | {v['heldout']} |" for g, v in card["groups"].items()]
    lines += ["", "Sources and licences:", ""]
    lines += [f"- {k}: {v['what']} (Debian {v['package']} {v['version'] or ''}), {v['licence']}" for k, v in card["sources"].items()]
    return "\n".join(lines) + "\n"


DATASETS = {"emoji": prepare_emoji}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a real captioned image dataset as an imagefolder.")
    parser.add_argument("name", choices=sorted(DATASETS), help="which dataset")
    parser.add_argument("out", type=Path, help="output folder (replaced)")
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    parser.add_argument("--heldout", type=int, default=DEFAULT_HELDOUT, help="held-out images")
    parser.add_argument("--font", type=Path, default=EMOJI_FONT, help="NotoColorEmoji.ttf")
    parser.add_argument("--emoji-test", type=Path, default=EMOJI_TEST, help="Unicode's emoji-test.txt")
    parser.add_argument("--annotations", type=Path, nargs="+", default=list(CLDR_ANNOTATIONS),
                        help="CLDR annotations/en.xml and annotationsDerived/en.xml")
    parser.add_argument("--no-install", action="store_true", help="never run the package manager")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error("--size must be at least 8")
    try:
        card = DATASETS[args.name](args.out, size=args.size, heldout=args.heldout, font=args.font,
                                   emoji_test=args.emoji_test, annotations=args.annotations, install=not args.no_install)
    except PrepareError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.out}: {card['images']} images ({card['train']} train, {card['heldout']} held out), "
          f"{len(card['groups'])} groups; see {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
