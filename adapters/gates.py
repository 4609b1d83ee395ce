"""Subject gates: a vector added to one layer's output at the tokens that name a subject, nowhere else.

A locate-and-edit weight update fires on every input whose key resembles the edited subject's,
so stacked edits move their neighbours ("Rome" edited, "Milan" moves with it): on SmolLM2 that,
not forgetting, is what limits 100 stacked AlphaEdit edits (benchmarks/RESULTS.md). A gate makes
the match exact: the edit's target-vector change (MEMIT's z - h at the subject's last token) is
added only where the input holds one of the subject's token patterns, as the served tokenizer
writes it. Inputs that do not name the subject run the base model bit for bit.

One GateBank per model holds the gates of every applied delta; a forward pre-hook on the input
embedding reads the ids, and a forward hook per gated module adds the vectors at the matched tokens.
Matching is on the ids the model has read: a full forward (teacher forcing, the prompt of a
generation) sees every occurrence, and a cached decoding step matches its new token together with
the tokens before it, so a subject the model writes in its own answer ("Dublin is a city in ...",
where "Dublin" at the answer's start is three tokens) gets the vector exactly as under teacher forcing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from adapters.hooks import get_module

PAD = -1  # pads a shorter pattern in GateSet.ids
HISTORY = 64  # tokens of earlier calls kept for matching a decoding step (longer than any subject's pattern)


@dataclass
class GateSet:
    """Gated vectors of one module: vectors [n, d]; patterns ids [p, L] (PAD-padded), rows [p] -> vector."""

    vectors: torch.Tensor
    ids: torch.Tensor
    rows: torch.Tensor

    def patterns(self) -> list[tuple[tuple[int, ...], int]]:
        """(token ids, vector row) per pattern, padding dropped."""
        return [(tuple(int(t) for t in row if int(t) != PAD), int(r)) for row, r in zip(self.ids, self.rows)]

    def scaled(self, factor: float) -> GateSet:
        """The same patterns with every vector times factor."""
        return GateSet(self.vectors * factor, self.ids, self.rows)

    def __add__(self, other: GateSet) -> GateSet:
        """Both sets' vectors and patterns (the other's rows shifted past this one's vectors)."""
        width = max(self.ids.shape[1], other.ids.shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD)  # noqa: E731
        return GateSet(torch.cat([self.vectors, other.vectors]), torch.cat([pad(self.ids), pad(other.ids)]),
                       torch.cat([self.rows, other.rows + self.vectors.shape[0]]))

    @classmethod
    def of(cls, vectors: torch.Tensor, patterns: list[tuple[list[int], int]]) -> GateSet:
        """A set from vectors [n, d] and (token ids, vector row) pairs."""
        width = max(len(p) for p, _ in patterns)
        ids = torch.full((len(patterns), width), PAD, dtype=torch.long)
        for i, (p, _) in enumerate(patterns):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        return cls(vectors, ids, torch.tensor([r for _, r in patterns], dtype=torch.long))


Index = dict[int, list[tuple[tuple[int, ...], int]]]  # last token -> (pattern, vector row) of every pattern


def _scan(ids: torch.Tensor, by_last: Index) -> tuple[list[int], list[int], list[int]]:
    """(batch rows, positions, vector rows) where an indexed pattern ends in ids [b, t]; a vector once per token."""
    rows: list[int] = []
    cols: list[int] = []
    which: list[int] = []
    for b, seq in enumerate(ids.tolist()):
        for t, tok in enumerate(seq):
            fired: set[int] = set()  # a vector fires once per token, however many of its patterns end there
            for pattern, v in by_last.get(tok, ()):
                n = len(pattern)
                if v not in fired and t + 1 >= n and tuple(seq[t + 1 - n:t + 1]) == pattern:
                    fired.add(v)
                    rows.append(b)
                    cols.append(t)
                    which.append(v)
    return rows, cols, which


def find(ids: torch.Tensor, patterns: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) in ids [b, t] where one of the patterns ends (each place once): where a gate fires."""
    by_last: Index = {}
    for p in patterns:
        by_last.setdefault(p[-1], []).append((tuple(p), 0))
    rows, cols, _ = _scan(ids, by_last)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


class GateBank:
    """The gates applied to one model, keyed by who added them (a delta), with the hooks that fire them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.entries: dict[Any, dict[str, GateSet]] = {}
        self.paused = 0
        self._ids: torch.Tensor | None = None
        # Cached decoding: the tokens read so far (the last HISTORY), whether this call continues them,
        # and how many of them lead this call's ids in self._ids (matches there fired in earlier calls).
        self._history: torch.Tensor | None = None
        self._continuing = False
        self._lead = 0
        self._longest = 1  # tokens in the longest pattern (set with the index)
        self._index: dict[str, tuple[torch.Tensor, Index]] | None = None
        self._hooks: dict[str, Any] = {}
        # The ids are read where every path turns them into vectors, the input embedding (adapters call
        # the whole model or only its body); a call that starts from vectors (inputs_embeds) has no ids,
        # so each entry point forgets the last call's first and no gate fires on stale ids.
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        entries = [model] + ([body] if isinstance(body, torch.nn.Module) and body is not model else [])
        self._pre = [m.register_forward_pre_hook(self._forget, with_kwargs=True) for m in entries]
        self._pre.append(model.get_input_embeddings().register_forward_pre_hook(self._read_ids))

    def _forget(self, _m: torch.nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        self._ids = None
        self._continuing = _continues_cache(kwargs)
        if not self._continuing:  # a new sequence: no earlier call's tokens may complete a pattern
            self._history = None

    def _read_ids(self, _m: torch.nn.Module, args: tuple) -> None:
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            self._ids = self._history = None
            return
        before = self._history
        if self._continuing and before is not None and before.shape[0] == ids.shape[0]:
            self._lead = before.shape[1]
            self._ids = torch.cat([before, ids.to(before.device)], 1)
        else:
            self._lead, self._ids = 0, ids
        self._history = self._ids[:, -HISTORY:]

    def add(self, key: Any, gates: Mapping[str, GateSet]) -> None:
        """Fire these gates from now on (a key already present is replaced)."""
        if not gates:
            return
        self.entries[key] = dict(gates)
        for module in gates:
            if module not in self._hooks:
                self._hooks[module] = get_module(self.model, module).register_forward_hook(_Fire(self, module))
        self._index = None

    def remove(self, key: Any) -> None:
        """Stop firing the gates added under key (nothing if there are none)."""
        if self.entries.pop(key, None) is not None:
            self._index = None

    def clear(self) -> None:
        """No gates at all: the model is its weights again."""
        self.entries.clear()
        self._index = None

    def __len__(self) -> int:
        return sum(s.vectors.shape[0] for g in self.entries.values() for s in g.values())

    @contextmanager
    def off(self) -> Iterator[None]:
        """No gate fires inside the block (statistics and caches of the base model)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def _built(self) -> dict[str, tuple[torch.Tensor, Index]]:
        # Per module: every vector stacked, and the patterns indexed by their last token, so one pass
        # over the input's tokens finds every match.
        if self._index is None:
            index: dict[str, tuple[list[torch.Tensor], Index]] = {}
            for gates in self.entries.values():
                for module, s in gates.items():
                    vecs, by_last = index.setdefault(module, ([], {}))
                    base = sum(v.shape[0] for v in vecs)
                    vecs.append(s.vectors.detach().float())
                    for pattern, row in s.patterns():
                        by_last.setdefault(pattern[-1], []).append((pattern, base + row))
            self._index = {m: (torch.cat(v), b) for m, (v, b) in index.items()}
            self._longest = max((len(p) for _, b in index.values() for ps in b.values() for p, _ in ps), default=1)
        return self._index

    def matches(self, ids: torch.Tensor, module: str) -> tuple[list[int], list[int], list[int]]:
        """(batch rows, token positions, vector rows) where a pattern of module's gates ends in ids [b, t]."""
        built = self._built().get(module)
        return _scan(ids, built[1]) if built is not None else ([], [], [])

    def fire(self, module: str, output: Any) -> Any:
        """The module's output with the vectors added at the tokens matched in this call's ids (None: unchanged)."""
        if self.paused or self._ids is None or not self.entries:
            return None
        h = output[0] if isinstance(output, tuple) else output
        ids, lead = self._ids, self._lead
        if lead:  # a decoding step: the earlier tokens a pattern ending in this call's can reach, no more
            self._built()
            cut = max(0, lead - (self._longest - 1))
            ids, lead = ids[:, cut:], lead - cut
        rows, cols, which = self.matches(ids, module)
        if lead:  # only matches ending at this call's own tokens, at their place in h
            keep = [i for i, c in enumerate(cols) if c >= lead]
            rows, cols, which = [rows[i] for i in keep], [cols[i] - lead for i in keep], [which[i] for i in keep]
        if not rows or tuple(h.shape[:2]) != (ids.shape[0], ids.shape[1] - lead):
            return None
        vecs = self._built()[module][0].to(device=h.device, dtype=h.dtype)
        h = h.index_put((torch.tensor(rows), torch.tensor(cols)), vecs[torch.tensor(which)], accumulate=True)
        return (h, *output[1:]) if isinstance(output, tuple) else h


def _continues_cache(kwargs: dict[str, Any]) -> bool:
    """Whether a model call goes on from cached earlier tokens (a decoding step), from its cache arguments."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0]) > 0
    for name in ("cache", "past_key_values"):  # transformers 5 names it cache; older versions past_key_values
        past = kwargs.get(name)
        if past is not None:
            length = getattr(past, "get_seq_length", None)
            return bool(length() > 0) if callable(length) else bool(past)
    return False


class _Fire:
    """A module's forward hook: an object, not a closure, so a deep copy of the model (hooks, bank and
    all) fires its own copy of the bank rather than the original's."""

    def __init__(self, bank: GateBank, module: str) -> None:
        self.bank, self.module = bank, module

    def __call__(self, _m: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
        return self.bank.fire(self.module, output)


def hash_gates(model: torch.nn.Module, h: Any) -> None:
    """Feed the gates firing on the model, in the order they were added, to a hashlib object (none: nothing)."""
    bank = model.__dict__.get("_kbsync_gates")
    if bank is None or bank.paused:
        return
    for gates in bank.entries.values():
        for module, g in sorted(gates.items()):
            h.update(module.encode())
            for t in (g.vectors.detach().float(), g.ids, g.rows):
                h.update(t.contiguous().cpu().numpy().tobytes())


def active(model: torch.nn.Module) -> bool:
    """Whether any gate can fire on the model now."""
    bank = model.__dict__.get("_kbsync_gates")
    return bank is not None and not bank.paused and bool(bank.entries)


def firing(model: torch.nn.Module, ids: torch.Tensor) -> str:
    """A digest of the gates that fire on ids [1, t] (where and what they add); "" when none does.

    Equal digests and equal weights mean equal outputs for these ids: a cache of what the model
    said about an input stays valid across gated edits that do not fire on it.
    """
    if not active(model):
        return ""
    bank = model.__dict__["_kbsync_gates"]
    h, fired = hashlib.sha256(), False
    for module in sorted(bank._built()):
        rows, cols, which = bank.matches(ids, module)
        vecs = bank._built()[module][0]
        for b, t, v in sorted(zip(rows, cols, which)):
            fired = True
            h.update(f"{module}\0{b}\0{t}\0".encode())
            h.update(vecs[v].contiguous().numpy().tobytes())
    return h.hexdigest()[:16] if fired else ""


def bank_for(model: torch.nn.Module) -> GateBank:
    """The model's gate bank, made (hooks installed) on first use."""
    bank = model.__dict__.get("_kbsync_gates")
    if bank is None:
        bank = GateBank(model)
        model.__dict__["_kbsync_gates"] = bank
    return bank


@contextmanager
def gates_off(model: torch.nn.Module) -> Iterator[None]:
    """No gate fires on this model inside the block (nothing to do when it has none)."""
    bank = model.__dict__.get("_kbsync_gates")
    if bank is None:
        yield
        return
    with bank.off():
        yield


@contextmanager
def gated(model: torch.nn.Module, gates: Mapping[str, GateSet]) -> Iterator[None]:
    """These gates fire on the model for the block only (a proposed delta judged without applying it)."""
    if not gates:
        yield
        return
    bank = bank_for(model)
    key = object()
    bank.add(key, gates)
    try:
        yield
    finally:
        bank.remove(key)


@contextmanager
def restoring(model: torch.nn.Module) -> Iterator[None]:
    """The gates firing at the block's start are exactly those firing after it (a run that applies and resets)."""
    bank = bank_for(model)
    saved = dict(bank.entries)
    try:
        yield
    finally:
        bank.entries = saved
        bank._index = None
