"""Pictures of a run: loss curves, and which positions each routing head groups together.

`plot_losses` reads metrics.jsonl; `plot_clusters` runs the model on one validation sequence, captures
the (normalised, if qk_layernorm) queries entering a routing layer's attention with a forward pre-hook
(read-only), and colours every position by its nearest centroid (ops.kmeans.nearest_centroid).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ..ops.kmeans import nearest_centroid  # noqa: E402
from .metrics import read_metrics  # noqa: E402


def plot_losses(run_dir: str | Path, out: str | Path) -> Path:
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps to plot: train first")
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train cross-entropy")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label=f"{evals[0]['split']} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.set_title(f"loss: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("schedule")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def routing_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if getattr(layer.attn, "routing", None) is not None]


@torch.no_grad()
def cluster_ids(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """(H_r, T) nearest-centroid id of each position's query in routing layer `layer` for tokens (1, T)."""
    routing = model.layers[layer].attn.routing
    captured = {}

    def hook(module, args):
        captured["q"] = args[0]

    handle = routing.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        model(tokens)
    finally:
        handle.remove()
        model.train(was_training)
    q = captured["q"]
    if routing.qk_layernorm:
        q = F.layer_norm(q, (q.shape[-1],))
    return nearest_centroid(q, routing.centroids.centroids)[0]


def plot_clusters(model, tokens: torch.Tensor, out: str | Path, *, layer: int | None = None,
                  labels: list[str] | None = None) -> Path:
    layers = routing_layers(model)
    if not layers:
        raise ValueError("the model has no routing heads (all layers local): nothing to plot")
    layer = layers[-1] if layer is None else layer
    if layer not in layers:
        raise ValueError(f"layer {layer} has no routing heads; routing layers: {layers}")
    ids = cluster_ids(model, tokens, layer).cpu().numpy()
    H, T = ids.shape
    C = model.config.sparsity_cluster_size
    fig, ax = plt.subplots(figsize=(min(18, 2 + T / 24), 1.2 + 0.6 * H))
    cmap = plt.get_cmap("tab20", C) if C <= 20 else plt.get_cmap("viridis", C)
    im = ax.imshow(ids, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=C - 0.5)
    ax.set_yticks(range(H), [f"head {h}" for h in range(H)])
    ax.set_xlabel("position in the sample sequence")
    ax.set_title(f"routing clusters (nearest centroid of each query), layer {layer}, {C} clusters")
    if labels is not None and T <= 96:
        ax.set_xticks(range(T), labels, fontsize=6, family="monospace")
    fig.colorbar(im, ax=ax, ticks=range(C), label="cluster id", fraction=0.03)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def cluster_summary(ids: np.ndarray) -> list[list[int]]:
    """Per head, how many positions each cluster holds (for the CLI's text report)."""
    return [np.bincount(row, minlength=int(ids.max()) + 1).tolist() for row in ids]
