"""Where a served model runs and in which precision: `[model] device` and `[model] dtype`.

"auto" picks CUDA when torch sees a GPU (else the CPU) and bf16 on a GPU (fp32 on the CPU), the
precision models are served in. A device or dtype the machine cannot do is a one-line error
before any weight is read.
"""

from __future__ import annotations

import torch

from kbsync.config import DEVICE_PATTERN
from kbsync.errors import BadInput

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """The torch device a `[model] device` setting names; an error where the machine has none such."""
    if not DEVICE_PATTERN.fullmatch(spec):
        raise BadInput(f"model.device must be auto, cpu, cuda or cuda:N, not {spec!r}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"model.device is {spec} but torch {torch.__version__} sees no CUDA device on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInput(f"model.device is {spec} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The weights' dtype a `[model] dtype` setting names on this device (auto: bf16 on a GPU, fp32 on the CPU)."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise BadInput(f"model.dtype must be auto, {', '.join(DTYPES)}, not {spec!r}")
    dtype = DTYPES[spec]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BadInput(f"model.dtype is bfloat16 but {torch.cuda.get_device_name(device)} cannot compute in it; use float16")
    return dtype
