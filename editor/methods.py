"""The editing-method interface and its registry (KnowledgeEditor, fine-tuning baselines, ...)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from editor.delta import Delta
from kbsync.errors import NotFound


@dataclass
class EditRequest:
    """One fact to write into the model: a prompt (question or claim) and its new target."""

    prompt: str
    target: str
    question: bool = True
    original: str = ""  # the model's current answer, which KnowledgeEditor conditions on
    paraphrases: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    claim_prefix: str = ""
    # The text taught as the answer, in the model's own answer style ("The capital of Namibia is
    # Windhoek." for a chat model that answers in sentences); empty: the bare target.
    answer: str = ""

    @property
    def taught(self) -> str:
        """What the edit's loss is on: the styled answer, else the target."""
        return self.answer or self.target


@dataclass
class EditResult:
    """The delta a method proposes (not applied), with how it got there."""

    delta: Delta
    success: bool
    steps: int
    seconds: float
    prediction: str = ""
    info: dict[str, Any] = field(default_factory=dict)


class EditMethod(ABC):
    """A way to turn an EditRequest into a Delta; the live model is unchanged when edit() returns."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, adapter: Any, **options: Any) -> None:
        self.adapter = adapter
        self.options = options

    @abstractmethod
    def edit(self, request: EditRequest) -> EditResult:
        """Propose a delta that makes the model answer request.target."""

    def propose(self, request: EditRequest) -> EditResult:
        """edit(); with the `shrink` option, then the smallest scale of its delta that keeps what it flipped."""
        result = self.edit(request)
        if _truthy(self.options.get("shrink", False)) and result.success:
            from editor.shrink import shrink

            result = shrink(self.adapter, request, result, float(self.options.get("shrink_tolerance", 0.05)))
        return result

    def flipped(self, request: EditRequest) -> tuple[bool, str]:
        """Whether the (currently applied) model answers the target for the prompt, and its answer."""
        from kbsync.match import match

        pred = self.adapter.predict([request.prompt], question=request.question)[0]
        return match(pred, request.target, request.aliases, request.claim_prefix).ok, pred

    @staticmethod
    def clock() -> float:
        """Monotonic seconds, for EditResult.seconds."""
        return time.perf_counter()


def _truthy(value: Any) -> bool:
    """Option values arrive as bools from config and as strings from `--option shrink=false`."""
    return value.strip().lower() not in ("", "0", "false", "no", "off") if isinstance(value, str) else bool(value)


METHODS: dict[str, type[EditMethod]] = {}
# A method name ending in this suffix ("ke-loop+shrink") is that method with the shrink option on.
SHRINK = "+shrink"
ALIASES = {"ft": "ft-layer", "ke+loop": "ke-loop"}


def register_method(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator adding a method under its name."""
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, adapter: Any, **options: Any) -> EditMethod:
    """Instantiate a registered method by name (imports the built-in methods first)."""
    import editor.finetune  # noqa: F401  (registers ft-layer, ft-all, zhu)
    import editor.ke  # noqa: F401  (registers ke, ke-loop)

    if name.endswith(SHRINK):
        name, options = name[: -len(SHRINK)], {**options, "shrink": True}
    name = ALIASES.get(name, name)
    try:
        cls = METHODS[name]
    except KeyError:
        raise NotFound(f"unknown edit method {name!r}; known: {', '.join(sorted(METHODS))}") from None
    return cls(adapter, **options)
