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
from ..ops.routing import assign_topk  # noqa: E402
from .metrics import read_metrics  # noqa: E402


def plot_losses(run_dir: str | Path, out: str | Path) -> Path:
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps to plot: train first")
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # only once there is something to draw
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
def routing_membership(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """(H_r, C, T) bool: the positions each cluster of routing layer `layer` holds for tokens (1, T).

    What the attention uses: with assign="topk" the `window` best-scoring queries of each cluster (a
    position may sit in several clusters or none); with "nearest" each query's argmax cluster.
    """
    routing = model.layers[layer].attn.routing
    captured = {}

    def hook(module, args):
        captured["q"], captured["k"] = args[0], args[1]

    handle = routing.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        model(tokens)
    finally:
        handle.remove()
        model.train(was_training)
    q, k = captured["q"], captured["k"]
    if routing.qk_layernorm:
        q = F.layer_norm(q, (q.shape[-1],))
        k = None if k is None else F.layer_norm(k, (k.shape[-1],))
    centroids = routing.centroids.centroids
    H, C, _ = centroids.shape
    T = q.shape[2]
    if routing.assign == "topk":
        index = assign_topk(q, q if routing.share_qk or k is None else k, centroids, routing.window).query_index[0]
        return torch.zeros(H, C, T, dtype=torch.bool).scatter_(-1, index.cpu(), True)
    ids = nearest_centroid(q, centroids)[0].cpu()
    return F.one_hot(ids, C).permute(0, 2, 1).bool()


def plot_clusters(model, tokens: torch.Tensor, out: str | Path, *, layer: int | None = None,
                  labels: list[str] | None = None) -> Path:
    """One panel per (routing layer, routing head): row c marks the positions cluster c holds."""
    layers = routing_layers(model)
    if not layers:
        raise ValueError("the model has no routing heads (all layers local): nothing to plot")
    if layer is not None and layer not in layers:
        raise ValueError(f"layer {layer} has no routing heads; routing layers: {layers}")
    shown = layers if layer is None else [layer]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    members = [routing_membership(model, tokens, i).numpy() for i in shown]
    H, C, T = members[0].shape
    mode = model.config.routing_assign
    fig, axes = plt.subplots(len(shown), H, figsize=(min(18, 2 + T / 24 * H), 0.6 + (0.35 + 0.18 * C) * len(shown)),
                             squeeze=False)
    base = plt.get_cmap("tab10" if C <= 10 else "viridis", C)
    cmap = matplotlib.colors.ListedColormap(["white"] + [base(c) for c in range(C)])
    for row, (i, member) in enumerate(zip(shown, members)):
        for h in range(H):
            ax = axes[row][h]
            # Cluster c's positions drawn in colour c + 1; 0 (white) marks positions the cluster lacks.
            image = np.where(member[h], np.arange(1, C + 1)[:, None], 0)
            ax.imshow(image, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=C + 0.5)
            ax.set_yticks(range(C), [str(c) for c in range(C)], fontsize=6)
            ax.set_title(f"layer {i}, routing head {h}", fontsize=8)
            if labels is not None and T <= 96 and row == len(shown) - 1:
                ax.set_xticks(range(T), labels, fontsize=6, family="monospace")
            if h == 0:
                ax.set_ylabel("cluster", fontsize=7)
    what = "top-window queries per cluster" if mode == "topk" else "argmax cluster of each query"
    fig.suptitle(f"routing clusters ({what}), {C} clusters; x: position in the sample sequence", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def cluster_summary(member: np.ndarray) -> list[list[int]]:
    """Per head, how many positions each cluster holds (for the CLI's text report); member (H, C, T)."""
    return member.sum(-1).astype(int).tolist()
