"""The editing-method interface, its life cycle and its registry.

A method is created once per served model (``make_method``), prepares its per-model artifacts
(``prepare``: a trained editor, covariance statistics), proposes one delta per fact
(``propose``), and is told when deltas are applied to or taken off the served model
(``on_applied`` / ``on_reset``), so a method that keeps state about earlier edits (AlphaEdit's
keys of applied edits) stays consistent with the delta store across reverts, other processes'
edits and restarts. Options are a dataclass per method: an unknown option is an error.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from editor.delta import Delta
from kbsync.errors import BadInput, NotFound


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
    # The entity the fact is about, as it occurs in the prompt ("Namibia"); locate-and-edit
    # methods read the model at its last token. Empty: the prompt's last token stands in.
    subject: str = ""
    # Other questions about the subject whose answers must not change (its other facts in the KB:
    # "What currency does Namibia use?" beside an edit of its capital). Methods that change what
    # the model holds about the subject (the target vector) keep these prompts' current answers.
    keep: tuple[str, ...] = ()

    @property
    def taught(self) -> str:
        """What the edit's loss is on: the styled answer, else the target."""
        return self.answer or self.target

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRequest:
        """The request a delta's meta recorded ("request"), tuples restored; ValueError on unknown keys."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping) or not {"prompt", "target"} <= data.keys() or data.keys() - names:
            raise ValueError(f"not an edit request: {data!r}"[:200])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class EditResult:
    """The delta a method proposes (not applied), with how it got there."""

    delta: Delta
    success: bool
    steps: int
    seconds: float
    prediction: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodOptions:
    """Options every method takes; a method's own options extend this dataclass."""

    # Scale the delta down to the smallest factor that keeps what it flipped (editor/shrink.py).
    shrink: bool = False
    shrink_tolerance: float = 0.05
    # "nullspace": project the delta's editable matrices onto the null space of preserved knowledge
    # (editor/preserve.py), with AlphaEdit's cut: eigenvalues below this times the mean eigenvalue.
    preserve: str = ""
    preserve_threshold: float = 1e-2
    # Token positions of the statistics corpus behind the null space (editor/memit/corpus.py).
    preserve_tokens: int = 60000


@dataclass
class MethodContext:
    """Where a method finds and keeps its per-model artifacts."""

    data_dir: Path | None = None
    cache_dir: Path | None = None
    # sha256 of the served model's base weights (before any delta): the key of cached statistics.
    base_fingerprint: str = ""
    # A context manager factory that puts the base weights in place for its block (statistics are
    # computed on the base model even while deltas are applied); None: the weights are the base.
    base_weights: Callable[[], AbstractContextManager[Any]] | None = None
    # Told (done, total) while prepare() computes something long (statistics); `kbsync editor stats` draws a bar.
    progress: Callable[[int, int], None] | None = None
    # Recompute cached statistics even where a file verifies (`kbsync editor stats --rebuild`).
    rebuild: bool = False


class EditMethod(ABC):
    """A way to turn an EditRequest into a Delta; the live model is unchanged when propose() returns."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options_cls: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, adapter: Any, options: MethodOptions | None = None, context: MethodContext | None = None) -> None:
        self.adapter = adapter
        self.options = options if options is not None else self.options_cls()
        self.context = context or MethodContext()
        self._preserver: Any = None

    def prepare(self) -> None:
        """Load or compute per-model artifacts (called once, by make_method); default: nothing."""
        if self.options.preserve:
            from editor.preserve import Preserver

            self._preserver = Preserver.for_method(self)

    @abstractmethod
    def edit(self, request: EditRequest) -> EditResult:
        """Propose a delta that makes the model answer request.target."""

    def propose(self, request: EditRequest) -> EditResult:
        """edit(); then, with the options, projection onto the preserved null space and shrinking."""
        result = self.edit(request)
        if self._preserver is not None:
            result = self._preserver.project_result(result)
        if self.options.shrink and result.success:
            from editor.shrink import shrink

            result = shrink(self.adapter, request, result, self.options.shrink_tolerance)
        # What was taught, exactly (prompt, wordings, styled answer, subject), in the checksummed
        # delta file: a later joint re-solve of the applied edits rebuilds its requests from it.
        result.delta.meta.setdefault("request", asdict(request))
        return result

    def on_applied(self, edit_id: int, delta: Delta) -> None:
        """A delta was added to the served model (its extras and meta; dense tensors may be absent)."""

    def consolidate(self, deltas: list[Delta]) -> Delta:
        """One delta standing for these applied deltas of this method (oldest first), made on the base model.

        Called with the base weights in place and no gate firing. The default is their sum, which
        serves exactly what the stack served (gates: the same vectors on the same patterns; weight
        updates: the same total, up to float rounding); a method with a joint write re-solves instead.
        """
        return Delta.sum(deltas)

    def on_reset(self) -> None:
        """The served model went back to its base weights (deltas follow again through on_applied)."""

    def flipped(self, request: EditRequest) -> tuple[bool, str]:
        """Whether the (currently applied) model answers the target for the prompt, and its answer."""
        return self._answers_target(request, [request.prompt])[0]

    def paraphrases_flipped(self, request: EditRequest) -> float:
        """The share of the request's paraphrases the (currently applied) model answers with the target; 1.0 for none."""
        if not request.paraphrases:
            return 1.0
        hits = self._answers_target(request, list(request.paraphrases))
        return sum(ok for ok, _ in hits) / len(hits)

    def _answers_target(self, request: EditRequest, prompts: list[str]) -> list[tuple[bool, str]]:
        """(answers the request's target under the match rules, the greedy answer) for each prompt, one batch."""
        from kbsync.match import match

        preds = self.adapter.predict(prompts, question=request.question)
        return [(match(p, request.target, request.aliases, request.claim_prefix).ok, p) for p in preds]

    @staticmethod
    def clock() -> float:
        """Monotonic seconds, for EditResult.seconds."""
        return time.perf_counter()


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _coerce(method: str, key: str, value: Any, kind: Any) -> Any:
    """An option value (from TOML, or a string from `--option k=v`) as its declared type."""
    where = f"option {key} of method {method}"
    if getattr(kind, "__origin__", None) is tuple:
        optional, base = False, "tuple[int, ...]"
    else:
        args = [a for a in getattr(kind, "__args__", (kind,)) if a is not type(None)]
        optional = len(args) < len(getattr(kind, "__args__", (kind,)))
        base = getattr(args[0], "__name__", str(args[0])) if len(args) == 1 else str(kind)
    if value is None and optional:
        return None
    if value is None and base == "str":
        return ""
    try:
        if base == "bool":
            if isinstance(value, str):
                v = value.strip().lower()
                if v not in _TRUE + _FALSE:
                    raise ValueError
                return v in _TRUE
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out != out:
                raise ValueError
            return out
        if base == "str":
            return str(value)
        if base.startswith("tuple[int"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise BadInput(f"{where} must be a {base}, not {value!r}") from None
    return value


def parse_options(cls: type[EditMethod], raw: dict[str, Any]) -> MethodOptions:
    """The method's options dataclass from raw values; unknown names or bad values are one-line errors."""
    opts_cls = cls.options_cls
    hints = get_type_hints(opts_cls)
    known = {f.name for f in dataclasses.fields(opts_cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BadInput(f"unknown option(s) {', '.join(unknown)} for method {cls.name}; known: {', '.join(sorted(known))}")
    values = {k: _coerce(cls.name, k, v, hints[k]) for k, v in raw.items()}
    opts = opts_cls(**values)
    if opts.preserve not in ("", "none", "nullspace"):
        raise BadInput(f"option preserve of method {cls.name} must be 'nullspace' or empty, not {opts.preserve!r}")
    if opts.preserve == "none":
        opts.preserve = ""
    return opts


METHODS: dict[str, type[EditMethod]] = {}
# A method name ending in this suffix ("ke-loop+shrink") is that method with the shrink option on.
SHRINK = "+shrink"
# A method name ending in this suffix ("ft-layer+preserve") is that method with preserve = "nullspace".
PRESERVE = "+preserve"
ALIASES = {"ft": "ft-layer", "ke+loop": "ke-loop"}


def register_method(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator adding a method under its name."""
    METHODS[cls.name] = cls
    return cls


def _builtins() -> None:
    import editor.alphaedit  # noqa: F401  (registers alphaedit)
    import editor.finetune  # noqa: F401  (registers ft-layer, ft-all, zhu)
    import editor.gated  # noqa: F401  (registers gated)
    import editor.ke  # noqa: F401  (registers ke, ke-loop)
    import editor.memit  # noqa: F401  (registers memit)


def method_class(name: str) -> tuple[type[EditMethod], dict[str, Any]]:
    """The registered class for a method name and the options its suffixes imply (+shrink, +preserve)."""
    _builtins()
    implied: dict[str, Any] = {}
    while name.endswith((SHRINK, PRESERVE)):
        if name.endswith(SHRINK):
            name, implied["shrink"] = name[: -len(SHRINK)], True
        else:
            name, implied["preserve"] = name[: -len(PRESERVE)], "nullspace"
    name = ALIASES.get(name, name)
    try:
        return METHODS[name], implied
    except KeyError:
        raise NotFound(f"unknown edit method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def canonical(name: str) -> str:
    """The method name with aliases resolved ("ft" -> "ft-layer"), suffixes kept."""
    base, suffix = name, ""
    while base.endswith((SHRINK, PRESERVE)):
        cut = SHRINK if base.endswith(SHRINK) else PRESERVE
        base, suffix = base[: -len(cut)], cut + suffix
    return ALIASES.get(base, base) + suffix


def make_method(name: str, adapter: Any, context: MethodContext | None = None, defaults: dict[str, Any] | None = None,
                **options: Any) -> EditMethod:
    """Create and prepare a registered method; `defaults` apply only where the method has that option."""
    cls, implied = method_class(name)
    context = context or MethodContext()
    if "data_dir" in options:  # older callers pass the data directory as an option
        context = dataclasses.replace(context, data_dir=Path(options.pop("data_dir")))
    known = {f.name for f in dataclasses.fields(cls.options_cls)}
    raw = {**{k: v for k, v in (defaults or {}).items() if k in known}, **options, **implied}
    method = cls(adapter, parse_options(cls, raw), context)
    method.prepare()
    return method
