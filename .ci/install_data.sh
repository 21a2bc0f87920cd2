#!/usr/bin/env bash
# Debian's emoji font and Unicode/CLDR data, from which `python -m ldm.data.prepare emoji` draws
# the real-image dataset (tests/test_prepare.py). Idempotent: installs only what is missing.
set -euo pipefail

packages=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || packages+=(fonts-noto-color-emoji)
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || packages+=(unicode-data)
[ -f /usr/share/unicode/cldr/common/annotations/en.xml ] || packages+=(unicode-cldr-core)
if [ ${#packages[@]} -eq 0 ]; then
    echo "emoji data present"
    exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "not root and no sudo: cannot apt-get install ${packages[*]}" >&2; exit 1; }
    SUDO=(sudo -n)
fi
"${SUDO[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"
