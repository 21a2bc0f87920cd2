#!/usr/bin/env bash
# Debian's chromium for the Playwright browser test (tests/test_app_browser.py).
#
# Never `playwright install`: that downloads a browser build from a CDN, which CI cannot reach;
# the Playwright Python package drives the system chromium through executable_path instead.
# Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "no apt-get here: install chromium at /usr/bin/chromium yourself" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "not root and no sudo: cannot apt-get install chromium" >&2; exit 1; }
    SUDO=(sudo -n)   # never prompt: CI has no one to type a password
fi
"${SUDO[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q chromium
/usr/bin/chromium --version
