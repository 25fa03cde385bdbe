"""Attention modules: local heads, routing heads, and the mixed-heads layer that combines them.

Legend: B batch, T tokens, H heads (H_l local + H_r routing), D head dim, C clusters, M max relative
distance.

`LocalAttention` and `RoutingAttention` take already projected heads (B, h, T, D) and own only what
is specific to them (relative-position tables, rotary; centroids). `MixedAttention` owns the single
qkv projection and the output projection, and calls each op once for its whole head group.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..ops import kmeans, local_attention, routing_attention
from .centroids import RoutingCentroids
from .rotary import RotaryEmbedding


class LocalAttention(nn.Module):
    """Blocked local attention over H_l heads with Shaw et al. relative positions or rotary.

    position="shaw": key and value tables (2M + 1, D) shared by the heads of the layer, distance
    clipped to [-M, M]; "rotary": q and k rotated by position; "none": content only.
    """

    def __init__(self, head_dim: int, *, block: int, flange: int, causal: bool, position: str = "shaw",
                 max_relative_distance: int = 513, backend: str = "auto") -> None:
        super().__init__()
        self.block, self.flange, self.causal, self.backend = block, flange, causal, backend
        self.position = position
        self.rel_k = self.rel_v = None
        self.rotary = None
        if position == "shaw":
            rows = 2 * max_relative_distance + 1
            self.rel_k = nn.Parameter(torch.randn(rows, head_dim) * 0.02)
            self.rel_v = nn.Parameter(torch.randn(rows, head_dim) * 0.02)
        elif position == "rotary":
            self.rotary = RotaryEmbedding(head_dim)
        elif position != "none":
            raise ValueError(f'position must be "shaw", "rotary" or "none", got {position!r}')

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H_l, T, D) -> (B, H_l, T, D)."""
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        rel_k = rel_v = None
        if self.rel_k is not None:
            rel_k, rel_v = self.rel_k.to(q.dtype), self.rel_v.to(q.dtype)
        return local_attention(q, k, v, block=self.block, flange=self.flange, causal=self.causal,
                               rel_k=rel_k, rel_v=rel_v, backend=self.backend)


class RoutingAttention(nn.Module):
    """Routing (online k-means) attention over H_r heads.

    share_qk: keys are the queries (k is ignored), and the same tensor object goes in as q and k so the
    op assigns clusters once. qk_layernorm: q and k are LayerNorm-normalised (no scale or bias) before
    routing and attention, as the authors' code does. In training mode each forward adds k-means
    statistics of LayerNorm(q) (and LayerNorm(k) when not shared) to `centroids`' pending buffers,
    assignment = argmax centroid; the centroids change only in the explicit `update_centroids` call.
    """

    def __init__(self, centroids: RoutingCentroids, *, window: int, causal: bool, assign: str = "topk",
                 share_qk: bool = False, qk_layernorm: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.centroids = centroids
        self.window, self.causal, self.assign = window, causal, assign
        self.share_qk, self.qk_layernorm, self.backend = share_qk, qk_layernorm, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, *,
                compute_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k, v (B, H_r, T, D) -> (out (B, H_r, T, D), commitment loss or None).

        The loss (unweighted) is the mean squared distance of LayerNorm(q) to its centroid, plus the same
        for k when keys are separate; gradients reach q and k, never the centroids.
        """
        D = q.shape[-1]
        if self.qk_layernorm:
            q = F.layer_norm(q, (D,))
        if self.share_qk:
            k = q
        elif self.qk_layernorm:
            k = F.layer_norm(k, (D,))
        if self.centroids.pending_init_seed is not None:
            # Explicit data-dependent init (RoutingTransformerLM.init_centroids); keys join the queries.
            self.centroids.initialize_from(kmeans.normalize(q if k is q else torch.cat([q, k], dim=2)),
                                           seed=self.centroids.pending_init_seed)
            self.centroids.pending_init_seed = None
        centroids = self.centroids.centroids
        out = routing_attention(q, k, v, centroids, window=self.window, causal=self.causal,
                                assign=self.assign, backend=self.backend)
        if not (self.training or compute_aux):
            return out, None
        loss = None
        for x in (q,) if k is q else (q, k):
            x_normed = kmeans.normalize(x)
            with torch.no_grad():
                assignment = torch.einsum("bhtd,hcd->bhtc", x_normed, centroids.to(x_normed.dtype)).argmax(-1)
            if self.training:
                self.centroids.accumulate(x_normed, assignment)
            if compute_aux:
                term = kmeans.commitment_loss(x_normed, centroids, assignment)
                loss = term if loss is None else loss + term
        return out, loss


class MixedAttention(nn.Module):
    """One attention layer: the first `num_local` heads local, the rest routing.

    One qkv projection (no bias, as the authors' code) of width H*D (q) + H_l*D (local k) + H_r*D (routing
    k, absent with shared QK) + H*D (v); each op runs once on its head group; outputs are concatenated
    in head order and projected back to `dim`.
    """

    def __init__(self, config: ModelConfig, num_local: int, centroids: RoutingCentroids | None = None) -> None:
        super().__init__()
        H, D = config.heads, config.head_dim
        if not 0 <= num_local <= H:
            raise ValueError(f"num_local must be in [0, heads={H}], got {num_local}")
        self.heads, self.head_dim = H, D
        self.num_local, self.num_routing = num_local, H - num_local
        self.share_qk = bool(config.share_qk)
        k_route = 0 if self.share_qk else self.num_routing * D
        self.widths = [H * D, num_local * D, k_route, H * D]
        self.qkv = nn.Linear(config.dim, sum(self.widths), bias=False)
        self.out = nn.Linear(H * D, config.dim, bias=False)
        self.local = None
        if num_local:
            self.local = LocalAttention(
                D, block=config.query_shape, flange=config.memory_flange, causal=config.causal,
                position=config.position, max_relative_distance=config.max_relative_distance,
                backend=config.attention_backend)
        self.routing = None
        if self.num_routing:
            if centroids is None:
                centroids = RoutingCentroids(self.num_routing, config.sparsity_cluster_size, D,
                                             decay=config.centroid_decay, variant=config.centroid_update)
            elif centroids.centroids.shape != (self.num_routing, config.sparsity_cluster_size, D):
                raise ValueError(
                    f"shared centroids have shape {tuple(centroids.centroids.shape)}, this layer needs "
                    f"{(self.num_routing, config.sparsity_cluster_size, D)}")
            self.routing = RoutingAttention(
                centroids, window=config.sparsity_cluster_attention_window, causal=config.causal,
                assign=config.routing_assign, share_qk=self.share_qk, qk_layernorm=config.qk_layernorm,
                backend=config.attention_backend)

    def forward(self, x: torch.Tensor, *, compute_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, dim) -> (out (B, T, dim), unweighted commitment loss or None)."""
        B, T, _ = x.shape
        D, L = self.head_dim, self.num_local
        q, k_local, k_route, v = self.qkv(x).split(self.widths, dim=-1)

        # Each head group is made contiguous (B, h, T, D): the Triton ops' backward (and their fake
        # kernels under torch.compile) assume that layout, and measured eager steps get faster too.
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, -1, D).transpose(1, 2).contiguous()

        q, v = q.view(B, T, -1, D), v.view(B, T, -1, D)
        outs, aux = [], None
        if self.local is not None:
            outs.append(self.local(heads(q[:, :, :L]), heads(k_local), heads(v[:, :, :L])))
        if self.routing is not None:
            k = None if self.share_qk else heads(k_route)
            out, aux = self.routing(heads(q[:, :, L:]), k, heads(v[:, :, L:]), compute_aux=compute_aux)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.out(out.transpose(1, 2).reshape(B, T, self.heads * D)), aux
