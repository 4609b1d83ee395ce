"""The KnowledgeEditor hyper-network (De Cao, Aziz, Titov 2021, Sec. 4 and Eq. 3).

A one-layer bidirectional LSTM reads "<original> >> <target> || <input>" (embeddings
initialised from the edited model's), a linear layer and tanh turn its final states into
a condition vector h in [-1, 1], and for every editable matrix W (n x m) a small FFNN on h predicts
alpha, beta in R^m, gamma, delta in R^n and a scalar eta. The update is
    dW = sigmoid(eta) * (alpha_hat * grad_W L + beta_hat),
    alpha_hat = gamma softmax(alpha)^T,  beta_hat = delta softmax(beta)^T   (both n x m, W's shape),
where grad_W L is the gradient of the new fact's loss at the current weights, an input that
is not differentiated through (first order).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editor.delta import Delta
from editor.methods import EditRequest, EditResult
from kbsync.errors import KbsyncError


@dataclass
class HyperConfig:
    """Sizes of the hyper-network (paper: BiLSTM, FFNN [256, tanh, 1024], per-matrix heads)."""

    lstm_hidden: int = 128  # the paper's code: 2 x 128 final states into the 1024-wide tanh layer
    ffn_hidden: int = 256
    cond_dim: int = 1024
    # How the LSTM's final states become h. "tanh": h = tanh(Linear(states)), bounded in [-1, 1]
    # as in the paper's code (the "[256, tanh, 1024]": 256 inputs, tanh, 1024 outputs).
    # "mlp": Linear(ffn_hidden), tanh, Linear(cond_dim), the reading kbsync's first editors were
    # trained with; its h is unbounded, grew to norm ~45 on SmolLM2 and saturated every head's tanh.
    # A checkpoint whose config lacks the key is an "mlp" editor (load_editor).
    encoder_out: str = "tanh"
    head_hidden: int = 256
    max_len: int = 96
    label_smoothing: float = 0.1
    # Fine-tune the LSTM's input embeddings (initialised from the model's). Off by default: on a
    # 49k vocabulary the optimiser step over them costs more than the rest of the editor, and a
    # training set of facts touches only a few hundred of their rows.
    train_embeddings: bool = False
    # LayerNorm on the condition vector h: the other cure for the "mlp" encoder's saturated heads
    # (editor.analysis.update_parts). Off in the dataclass so that older editors load as trained.
    cond_norm: bool = False
    # Weight normalisation of the heads' two linear layers, as in the paper's code.
    head_weight_norm: bool = False
    matrices: list[str] = field(default_factory=list)


def condition_text(original: str, target: str, prompt: str) -> str:
    """The editor's input: original prediction >> new target || the input."""
    return f"{original} >> {target} || {prompt}"


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


ENCODER_OUTS = ("tanh", "mlp")


class ConditionEncoder(nn.Module):
    """BiLSTM over the condition text, then tanh(Linear) (or the older FFNN [ffn_hidden, tanh, cond_dim]) -> h."""

    def __init__(self, embeddings: torch.Tensor, cfg: HyperConfig) -> None:
        super().__init__()
        if cfg.encoder_out not in ENCODER_OUTS:
            raise KbsyncError(f"unknown editor encoder_out {cfg.encoder_out!r}; known: {', '.join(ENCODER_OUTS)}")
        self.embed = nn.Embedding.from_pretrained(embeddings.detach().clone().float(), freeze=not cfg.train_embeddings)
        self.lstm = nn.LSTM(embeddings.shape[1], cfg.lstm_hidden, num_layers=1, batch_first=True, bidirectional=True)
        if cfg.encoder_out == "tanh":
            self.ffn = nn.Sequential(nn.Linear(2 * cfg.lstm_hidden, cfg.cond_dim), nn.Tanh())
        else:
            self.ffn = nn.Sequential(nn.Linear(2 * cfg.lstm_hidden, cfg.ffn_hidden), nn.Tanh(),
                                     nn.Linear(cfg.ffn_hidden, cfg.cond_dim))
        if cfg.cond_norm:
            self.ffn.append(nn.LayerNorm(cfg.cond_dim))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Condition vectors [B, cond_dim] from padded token ids [B, T]."""
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.ffn(torch.cat([h[-2], h[-1]], dim=-1))


class MatrixHead(nn.Module):
    """Predicts (alpha, beta, gamma, delta, eta) for one n x m matrix and forms Eq. 3."""

    def __init__(self, n: int, m: int, cfg: HyperConfig) -> None:
        super().__init__()
        self.n, self.m = n, m
        self.net = nn.Sequential(nn.Linear(cfg.cond_dim, cfg.head_hidden), nn.Tanh(), nn.Linear(cfg.head_hidden, 2 * m + 2 * n + 1))
        # Start with a small update that still depends on h, so the constraint starts satisfied.
        nn.init.normal_(self.net[-1].weight, std=1e-3)
        nn.init.zeros_(self.net[-1].bias)
        if cfg.head_weight_norm:  # after the init: the norm g starts as the initial rows' norms
            from torch.nn.utils.parametrizations import weight_norm

            self.net[0], self.net[2] = weight_norm(self.net[0]), weight_norm(self.net[2])

    def coefficients(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """alpha [m], beta [m], gamma [n], delta [n], eta [] for one condition vector h [cond]."""
        out = self.net(h)
        m, n = self.m, self.n
        return out[:m], out[m:2 * m], out[2 * m:2 * m + n], out[2 * m + n:2 * m + 2 * n], out[-1]

    def parts(self, h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 3's two terms, each gated by sigmoid(eta): the gradient term and the beta_hat term (W's shape)."""
        alpha, beta, gamma, delta, eta = self.coefficients(h)
        alpha_hat = gamma[:, None] * torch.softmax(alpha, -1)[None, :]
        beta_hat = delta[:, None] * torch.softmax(beta, -1)[None, :]
        gate = torch.sigmoid(eta)
        return gate * (alpha_hat * grad), gate * beta_hat

    def forward(self, h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """dW = sigmoid(eta) * (alpha_hat * grad + beta_hat), shaped like W (n x m)."""
        scaled_grad, bias = self.parts(h, grad)
        return scaled_grad + bias


class HyperNetwork(nn.Module):
    """Condition encoder plus one head per editable matrix."""

    def __init__(self, embeddings: torch.Tensor, shapes: dict[str, tuple[int, int]], cfg: HyperConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = list(shapes)
        self.encoder = ConditionEncoder(embeddings, cfg)
        self.heads = nn.ModuleDict({_key(n): MatrixHead(*shapes[n], cfg) for n in self.names})

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, grads: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One update dict per example, from its condition tokens and its gradients."""
        h = self.encoder(ids, mask)
        return [{n: self.head(n)(h[i], g[n]) for n in self.names} for i, g in enumerate(grads)]

    def head(self, name: str) -> MatrixHead:
        """The head of one editable matrix, by the model's parameter name."""
        return self.heads[_key(name)]


def build_hypernet(adapter: Any, cfg: HyperConfig | None = None) -> HyperNetwork:
    """A fresh hyper-network for the adapter's editable matrices."""
    cfg = cfg or HyperConfig()
    editable = adapter.editable()
    if not editable:
        raise KbsyncError(f"model {adapter.name} has no editable matrices for edit_layers={adapter.edit_layers!r}")
    cfg.matrices = list(editable)
    emb = adapter.model.get_input_embeddings().weight
    return HyperNetwork(emb, {n: tuple(p.shape) for n, p in editable.items()}, cfg).to(emb.device)


def encode_conditions(adapter: Any, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of condition texts with the edited model's tokenizer."""
    tok = adapter.tokenizer
    rows = [tok(t, add_special_tokens=False)["input_ids"][-max_len:] or [0] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(adapter.device), mask.to(adapter.device)


def edit_gradients(adapter: Any, prompt: str, target: str, question: bool, label_smoothing: float,
                   params: dict[str, torch.Tensor] | None = None, batch: dict[str, torch.Tensor] | None = None,
                   ) -> dict[str, torch.Tensor]:
    """grad_W of the new fact's loss for every editable matrix (at params, if given); detached.

    batch: the encoded (prompt, target), e.g. a cached adapter.with_prefix batch during training.
    """
    return edit_loss_and_gradients(adapter, prompt, target, question, label_smoothing, params, batch)[1]


def edit_loss_and_gradients(adapter: Any, prompt: str, target: str, question: bool, label_smoothing: float,
                            params: dict[str, torch.Tensor] | None = None, batch: dict[str, torch.Tensor] | None = None,
                            ) -> tuple[float, dict[str, torch.Tensor]]:
    """The new fact's loss (at params, if given) and its gradient for every editable matrix; detached."""
    editable = adapter.editable()
    if params is None:
        weights = {n: p.detach().requires_grad_(True) for n, p in editable.items()}
    else:
        weights = {n: params[n].detach().requires_grad_(True) for n in editable}
    if batch is None:
        batch = adapter.encode([prompt], [target], question=question)
    loss = adapter.loss(batch, params=weights, label_smoothing=label_smoothing)
    grads = torch.autograd.grad(loss, list(weights.values()))
    return float(loss.detach()), {n: g.detach() for n, g in zip(weights, grads)}


def save_editor(net: HyperNetwork, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the hyper-network's weights and config as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"config": json.dumps(asdict(net.cfg)), "extra": json.dumps(extra or {}, default=str)}
    state = net.state_dict()
    if not net.cfg.train_embeddings:  # a frozen copy of the model's embeddings (113 MB on SmolLM2): rebuilt at load
        state.pop("encoder.embed.weight")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_editor(path: str | Path, adapter: Any) -> HyperNetwork:
    """Load a trained hyper-network and check that it fits the adapter's editable matrices."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        stored = json.loads(meta["config"])
        stored.setdefault("encoder_out", "mlp")  # written before the key existed
        cfg = HyperConfig(**stored)
    except Exception as e:  # any unreadable checkpoint is one user-facing error
        raise KbsyncError(f"cannot read KnowledgeEditor checkpoint {path}: {e}") from None
    editable = adapter.editable()
    if sorted(cfg.matrices) != sorted(editable):
        raise KbsyncError(
            f"KnowledgeEditor {path} was trained for matrices {cfg.matrices[:2]}..., "
            f"but the model's editable matrices are {list(editable)[:2]}... (check model.edit_layers)"
        )
    emb = adapter.model.get_input_embeddings().weight
    net = HyperNetwork(emb, {n: tuple(editable[n].shape) for n in cfg.matrices}, cfg).to(emb.device)
    # Without the embedding in the file, the model's own (what a frozen copy was) is used.
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "encoder.embed.weight"]:
        raise KbsyncError(f"KnowledgeEditor checkpoint {path} does not fit its config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.eval()


@torch.no_grad()
def predict_delta(net: HyperNetwork, adapter: Any, request: EditRequest, params: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """One application of the editor at the current weights (or at params), and the new fact's loss there."""
    with torch.enable_grad():
        loss, grads = edit_loss_and_gradients(adapter, request.prompt, request.taught, request.question,
                                              net.cfg.label_smoothing, params)
    ids, mask = encode_conditions(adapter, [condition_text(request.original, request.taught, request.prompt)], net.cfg.max_len)
    return net(ids, mask, [grads])[0], loss


def apply_editor(method: Any, request: EditRequest, loops: int = 1) -> EditResult:
    """KE (+loop): apply the predicted update, re-applying at the new weights until the answer flips.

    A re-application after which the new fact's loss is no lower than before it is taken back
    and the loop stops (the first application is always kept): on SmolLM2 edits that never
    flip, five blind applications left a retain KL of ~10 for nothing (benchmarks/RESULTS.md).
    """
    net, adapter = method.net, method.adapter
    start = method.clock()
    total: dict[str, torch.Tensor] = {}
    kept, kept_pred = total, ""
    ok, pred, applied, losses = False, "", 0, []  # losses[k]: the new fact's loss after k applications

    def worse_than_before(loss: float) -> bool:
        return applied >= 2 and loss >= losses[-2]

    while not ok and applied < max(1, loops):
        weights = edited_weights(adapter, total) if total else None
        step, loss = predict_delta(net, adapter, request, weights)
        losses.append(loss)
        if worse_than_before(loss):
            break
        kept, kept_pred = total, pred
        total = {n: total.get(n, 0) + d for n, d in step.items()}
        applied += 1
        ok, pred = _flips(method, request, total)
    if not ok and applied >= 2 and len(losses) == applied:  # ran out of applications: judge the last one too
        losses.append(fact_loss(adapter, request, net.cfg.label_smoothing, total))
    if not ok and worse_than_before(losses[-1]):
        total, pred, applied = kept, kept_pred, applied - 1
    delta = Delta(total, {"method": method.name, "loops": applied})
    return EditResult(delta, ok, applied, method.clock() - start, pred, {"target_losses": losses})


def edited_weights(adapter: Any, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The editable matrices plus the (fp32) delta, each in its matrix's own dtype (bf16 models stay bf16)."""
    return {n: (p.detach() + delta[n]).to(p.dtype) if n in delta else p.detach() for n, p in adapter.editable().items()}


def _flips(method: Any, request: EditRequest, total: dict[str, torch.Tensor]) -> tuple[bool, str]:
    trial = Delta(dict(total))
    trial.apply(method.adapter.model)
    try:
        return method.flipped(request)
    finally:
        trial.remove(method.adapter.model)


@torch.no_grad()
def fact_loss(adapter: Any, request: EditRequest, label_smoothing: float, delta: dict[str, torch.Tensor]) -> float:
    """The new fact's loss with delta added to the editable matrices."""
    weights = edited_weights(adapter, delta)
    batch = adapter.encode([request.prompt], [request.taught], question=request.question)
    return float(adapter.loss(batch, params=weights, label_smoothing=label_smoothing))
