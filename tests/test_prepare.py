"""`python -m ldm.data.prepare emoji`: a real captioned imagefolder from Debian's emoji font and
Unicode/CLDR data, with a held-out split by hash and a card.

The data files come from Debian packages that `.ci/run` installs (fonts-noto-color-emoji,
unicode-data, unicode-cldr-core); the tests never install anything themselves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldm.data import prepare
from ldm.data.sources import DataReport, SourceConfig, open_source
from ldm.data.split import heldout_by_count

NEEDED = [prepare.EMOJI_FONT, prepare.EMOJI_TEST, *prepare.CLDR_ANNOTATIONS]
have_data = pytest.mark.skipif(not all(p.is_file() for p in NEEDED),
                               reason="needs Debian's fonts-noto-color-emoji, unicode-data and unicode-cldr-core "
                                      "(.ci/run installs them)")


@pytest.fixture(scope="module")
def emoji_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "emoji"
    card = prepare.prepare_emoji(out, size=24, heldout=20, install=False, limit=120)
    return out, card


@have_data
def test_emoji_folder_has_images_captions_split_and_card(emoji_folder):
    out, card = emoji_folder
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == card["images"] == 120
    assert len({r["group"] for r in rows}) >= 8  # drawn from across the list, not its first group
    for row in rows[:10]:
        image = Image.open(out / row["file_name"])
        assert image.size == (24, 24) and image.mode == "RGB"
        pixels = np.asarray(image)
        assert pixels.std() > 10  # a drawn glyph, not a blank square
        assert row["text"][0].startswith(row["name"])
    with_keywords = [r for r in rows if len(r["text"]) == 2]
    assert len(with_keywords) > len(rows) // 2  # CLDR keywords were found and appended
    held = (out / "heldout.txt").read_text().split()
    assert set(held) == heldout_by_count([r["file_name"] for r in rows], 20)
    assert card["train"] + card["heldout"] == card["images"] and card["heldout"] == 20
    assert sum(g["heldout"] for g in card["groups"].values()) == 20
    assert "Noto Color Emoji" in (out / "README.md").read_text()
    assert not (out.parent / "emoji.partial").exists()


@have_data
def test_emoji_folder_reads_as_an_imagefolder_with_nothing_skipped(emoji_folder):
    out, card = emoji_folder
    report = DataReport()
    records = list(open_source(SourceConfig(kind="imagefolder", path=str(out)), report))
    assert len(records) == card["images"]
    assert report.counts.get("ok") == card["images"]
    # the card, heldout.txt and README.md are dataset files, not skipped images or orphan captions
    assert set(report.counts) == {"ok"}
    by_id = {r.id: r for r in records}
    row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert by_id[row["file_name"]].captions == row["text"]


def test_missing_files_name_themselves_and_the_install_command(tmp_path):
    missing = tmp_path / "NotoColorEmoji.ttf"
    with pytest.raises(prepare.PrepareError) as err:
        prepare.ensure_files([missing], install=False)
    assert str(missing) in str(err.value)
    assert "apt-get install fonts-noto-color-emoji" in str(err.value)


def test_emoji_test_parser_keeps_fully_qualified_and_groups(tmp_path):
    text = ("# group: Smileys & Emotion\n# subgroup: face-smiling\n"
            "1F600 ; fully-qualified # 😀 E1.0 grinning face\n"
            "263A FE0F ; fully-qualified # ☺️ E0.6 smiling face\n"
            "263A ; unqualified # ☺ E0.6 smiling face\n"
            "# group: Component\n# subgroup: skin-tone\n"
            "1F3FB ; component # 🏻 E1.0 light skin tone\n"
            "# group: People & Body\n# subgroup: hand-fingers-closed\n"
            "1F44D 1F3FD ; fully-qualified # 👍🏽 E1.0 thumbs up: medium skin tone\n")
    path = tmp_path / "emoji-test.txt"
    path.write_text(text, encoding="utf-8")
    found = prepare.read_emoji_test(path)
    assert [e.name for e in found] == ["grinning face", "smiling face", "thumbs up: medium skin tone"]
    assert found[2].group == "People & Body" and found[2].code_points == "1f44d-1f3fd"
    assert found[2].file_name == "images/people-body/1f44d-1f3fd.png"
    kw = prepare.Emoji("x", "thumbs up", "g", "s", ("hand", "thumb", "thumbs up", "+1"))
    assert kw.captions() == ["thumbs up, hand, +1", "thumbs up"]  # keywords inside the name are not repeated


def test_cli_reports_missing_data_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["emoji", str(tmp_path / "out"), "--font", str(tmp_path / "none.ttf"), "--no-install"])
    assert "missing" in str(exit_info.value) and "none.ttf" in str(exit_info.value)
