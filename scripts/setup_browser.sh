#!/usr/bin/env bash
# Install what the review page's browser test needs: Debian's chromium and its driver (apt-get), and
# Selenium's Python bindings in .venv (the [test] extras). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "need root to apt-get install chromium chromium-driver" >&2
        exit 1
    fi
    echo "installing chromium and chromium-driver with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null
    }
fi
.venv/bin/python -c "import selenium" 2>/dev/null || .venv/bin/python -m pip install --disable-pip-version-check -q "selenium>=4.20"
chromium --version 2>/dev/null >&2 || true
