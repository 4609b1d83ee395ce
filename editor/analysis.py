"""Paper Figure 4 (mean normalised update magnitude per weight matrix and layer, by method), and
how much of a KnowledgeEditor update is Eq. 3's gradient term and how much its beta_hat term."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from editor.data import EditRecord
from editor.methods import EditRequest, make_method


def update_magnitudes(adapter: Any, records: list[EditRecord], methods: list[str],
                      options: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, float]]:
    """method -> parameter name -> mean over edits of ||dW||_F / ||W||_F."""
    options = options or {}
    weights = dict(adapter.model.named_parameters())
    out: dict[str, dict[str, float]] = {}
    for name in methods:
        method = make_method(name, adapter, **options.get(name, {}))
        acc: dict[str, list[float]] = {}
        for r in records:
            # The paper's Figure 4 edit: the bare prompt and target, no paraphrases or answer style.
            delta = method.edit(EditRequest(r.prompt, r.target, r.question, original=r.original)).delta
            for p, d in delta.tensors.items():
                acc.setdefault(p, []).append(float(d.norm() / weights[p].detach().norm().clamp(min=1e-12)))
        out[name] = {p: statistics.fmean(v) for p, v in acc.items()}
    return out


@torch.no_grad()
def update_parts(net: Any, adapter: Any, records: list[EditRecord]) -> dict[str, float]:
    """Mean norms of Eq. 3's gradient and beta_hat terms over the records' edits, and beta_hat's spread.

    beta_spread is sqrt(E||b - mean b||^2) / ||mean b|| over the edits' beta_hat terms (all
    editable matrices together): near 0, beta_hat is one fixed weight shift that every edit
    carries whatever the fact, which a series of edits adds up. head_spread is the same measure
    over the heads' raw outputs (alpha, beta, gamma, delta, eta): near 0, the condition text has
    no say and the update is a fixed rescaling of the gradient plus a fixed shift.
    """
    from editor.hypernet import condition_text, edit_loss_and_gradients, encode_conditions

    grad_norms, sq_norms, total, heads = [], [], None, []
    for r in records:
        req = r.request()
        with torch.enable_grad():
            _, grads = edit_loss_and_gradients(adapter, req.prompt, req.taught, req.question, net.cfg.label_smoothing)
        ids, mask = encode_conditions(adapter, [condition_text(req.original, req.taught, req.prompt)], net.cfg.max_len)
        h = net.encoder(ids, mask)[0]
        parts = [net.head(n).parts(h, grads[n]) for n in net.names]
        heads.append(torch.cat([net.head(n).net(h) for n in net.names]))
        grad_norms.append(float(torch.cat([g.flatten() for g, _ in parts]).norm()))
        bias = torch.cat([b.flatten() for _, b in parts])
        sq_norms.append(float(bias.square().sum()))
        total = bias if total is None else total + bias
    if total is None:
        return {"gradient_term": float("nan"), "beta_term": float("nan"), "beta_spread": float("nan"),
                "head_spread": float("nan")}
    mean = total / len(records)
    spread = max(statistics.fmean(sq_norms) - float(mean.square().sum()), 0.0) ** 0.5
    outs = torch.stack(heads)
    head_spread = float((outs - outs.mean(0)).square().sum(1).mean().sqrt() / outs.mean(0).norm().clamp(min=1e-12))
    return {"gradient_term": statistics.fmean(grad_norms), "beta_term": statistics.fmean(x ** 0.5 for x in sq_norms),
            "beta_spread": spread / max(float(mean.norm()), 1e-12), "head_spread": head_spread}


def plot_magnitudes(mags: dict[str, dict[str, float]], adapter: Any, path: str | Path) -> Path:
    """A heat map per method: rows = matrix kind, columns = layer; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(mags), figsize=(5 * len(mags), 3.5), squeeze=False)
    for ax, (method, per_param) in zip(axes[0], mags.items()):
        layers = sorted({adapter.layer_of(p) for p in per_param})
        kinds = sorted({p.split(f".{adapter.layer_of(p)}.", 1)[1].removesuffix(".weight") for p in per_param})
        grid = [[0.0] * len(layers) for _ in kinds]
        for p, v in per_param.items():
            layer = adapter.layer_of(p)
            kind = p.split(f".{layer}.", 1)[1].removesuffix(".weight")
            grid[kinds.index(kind)][layers.index(layer)] = v
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"{method}: mean ||dW|| / ||W||")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
