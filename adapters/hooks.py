"""Forward hooks on named modules: read a module's input and output, or change its output.

What locate-and-edit needs from a model (after ROME/MEMIT's nethook): the input of an MLP's
output matrix at the subject's last token (the key), and the model run with a vector added to
a layer's output at chosen positions (the target-vector optimisation). The model at the end of
a `with` block is the model at its start: every hook is removed, also on errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kbsync.errors import BadInput


@dataclass
class Captured:
    """What a traced module saw on the last forward pass: its first input and its output."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


@dataclass
class Trace:
    """Captured input/output per module name, filled while the `trace` block runs."""

    modules: dict[str, Captured] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Captured:
        return self.modules[name]


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule with this dotted name; a one-line error naming it when there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise BadInput(f"the model has no module {name!r}") from None


def _first(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x  # type: ignore[return-value]


@contextmanager
def trace(model: torch.nn.Module, names: list[str], keep_grad: bool = False) -> Iterator[Trace]:
    """Record each named module's input and output on every forward pass inside the block."""
    out = Trace({n: Captured() for n in names})
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(_m: torch.nn.Module, inputs: tuple, output: object) -> None:
            x, y = _first(inputs), _first(output)
            out.modules[name].input = x if keep_grad else x.detach()
            out.modules[name].output = y if keep_grad else y.detach()
        return hook

    try:
        for n in names:
            handles.append(get_module(model, n).register_forward_hook(hook_for(n)))
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(model: torch.nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the named module's output by fn(output) on every forward pass inside the block."""

    def hook(_m: torch.nn.Module, _inputs: tuple, output: object) -> object:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)  # type: ignore[arg-type]

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
