"""Model configuration: one typed dataclass, every field defaulted, named presets in presets.py.

Field names follow the authors' hyperparameters where they have one (google-research
routing_transformer): local_num_heads, sparsity_cluster_size (number of clusters),
sparsity_cluster_attention_window, sparsity_skip_first, query_shape, memory_flange.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ROUTING_ASSIGN = ("topk", "nearest")
POSITION_ENCODINGS = ("shaw", "rotary", "none")
NORM_PLACEMENTS = ("pre", "post")
FFN_KINDS = ("relu", "geglu")
CENTROID_UPDATES = ("ratio", "normalized_mean")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 512
    depth: int = 6
    heads: int = 8
    head_dim: int | None = None  # default dim // heads
    max_seq_len: int = 8192  # longest sequence the model accepts (a check; nothing is sized by it)
    causal: bool = True  # False: bidirectional encoder

    # Heads: the first local_num_heads of each layer are local, the rest routing (the paper: half).
    local_num_heads: int | None = None  # default heads // 2
    query_shape: int = 256  # local block length
    memory_flange: int = 256  # keys before (and, non-causal, after) each local block
    sparsity_cluster_size: int = 4  # number of routing clusters (centroids) per routing head
    sparsity_cluster_attention_window: int = 256  # tokens per cluster (top-k) / keys per query (nearest)
    sparsity_skip_first: int = 0  # the first layers are all-local (no routing heads)
    routing_assign: str = "topk"  # "topk" (the paper) or "nearest" (strictly causal, cached decoding)
    share_qk: bool | None = None  # routing heads use k = q; default: True when causal
    qk_layernorm: bool = False  # LayerNorm-normalise q and k of routing heads (authors' option)
    share_centroids: bool = False  # one centroid set for all layers (authors' code: one per layer)
    centroid_decay: float = 0.999
    centroid_update: str = "normalized_mean"  # paper's text (default: measured not to collapse) or "ratio" (authors' code)
    commitment_weight: float = 1e-4

    position: str = "shaw"  # local heads: "shaw" relative (Shaw et al. 2018), "rotary", or "none"
    max_relative_distance: int = 513
    norm: str = "pre"  # "pre" (the paper's seed) or "post"
    ffn: str = "relu"  # "relu" (seed) or "geglu" (authors' text configs)
    ffn_mult: float = 4.0
    dropout: float = 0.0  # residual and FFN dropout
    embedding_dropout: float = 0.0
    tie_embeddings: bool = True
    attention_backend: str = "auto"  # "auto" | "reference" | "triton"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "max_seq_len", "query_shape",
                     "sparsity_cluster_size", "sparsity_cluster_attention_window", "max_relative_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("memory_flange", "sparsity_skip_first"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative int, got {value!r}")
        for name in ("head_dim", "local_num_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"ModelConfig.{name} must be an int or None (the default), got {value!r}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"ModelConfig.head_dim must be a positive int, got {self.head_dim}")
        for name in ("causal", "qk_layernorm", "share_centroids", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.share_qk is not None and not isinstance(self.share_qk, bool):
            raise ValueError(f"ModelConfig.share_qk must be True, False or None (the default), got {self.share_qk!r}")
        if self.head_dim is None:
            if self.dim % self.heads:
                raise ValueError(
                    f"ModelConfig.dim ({self.dim}) is not divisible by heads ({self.heads}): "
                    "set head_dim explicitly or change dim/heads"
                )
            self.head_dim = self.dim // self.heads
        if self.local_num_heads is None:
            self.local_num_heads = self.heads // 2
        if not 0 <= self.local_num_heads <= self.heads:
            raise ValueError(f"ModelConfig.local_num_heads must be in [0, heads={self.heads}], got {self.local_num_heads}")
        if self.share_qk is None:
            self.share_qk = self.causal
        for name, allowed in (("routing_assign", ROUTING_ASSIGN), ("position", POSITION_ENCODINGS),
                              ("norm", NORM_PLACEMENTS), ("ffn", FFN_KINDS), ("centroid_update", CENTROID_UPDATES),
                              ("attention_backend", ("auto", "reference", "triton"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.routing_assign == "nearest" and not self.causal:
            raise ValueError('ModelConfig.routing_assign="nearest" needs causal=True; use "topk" for encoders')
        if not 0.0 <= self.centroid_decay < 1.0:
            raise ValueError(f"ModelConfig.centroid_decay must be in [0, 1), got {self.centroid_decay}")

    @property
    def sparsity_cluster_num_heads(self) -> int:
        """Routing heads per layer (after sparsity_skip_first): heads - local_num_heads."""
        return self.heads - self.local_num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)
