"""The Routing Transformer language model (decoder) and, with causal=False, bidirectional encoder.

Legend: B batch, T tokens, V vocabulary, dim model width.

    model = RoutingTransformerLM(ModelConfig(vocab_size=256, dim=64, depth=2, heads=4))
    logits, aux = model(tokens, return_aux_loss=True)      # (B, T, V), scalar
    (cross_entropy(logits, targets) + aux).backward(); optimizer.step()
    model.update_centroids()                                # once per optimizer step

Single-device code only: data parallelism, compile and checkpointing are applied from outside.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ModelConfig
from .modules.block import TransformerBlock
from .modules.centroids import AllReduce, RoutingCentroids, update_centroids

_TOKEN_DTYPES = (torch.int64, torch.int32)


class RoutingTransformerLM(nn.Module):
    """Token embedding (+ dropout), `depth` blocks of mixed local/routing heads, final LayerNorm (pre-LN
    only: post-LN blocks already end in one), output head tied to the embedding by default.

    Any 1 <= T <= config.max_seq_len works; nothing is padded or sized by the length.
    Set `validate_tokens = False` to skip the token-id range check (one host sync per forward, see
    `check_tokens`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a routeformer.ModelConfig, got {type(config).__name__}")
        if config.position == "rotary" and config.head_dim % 2:
            raise ValueError(f'position="rotary" needs an even head_dim, got {config.head_dim}: '
                             'change dim/heads (or head_dim) or use position="shaw"')
        self.config = config
        self.validate_tokens = True
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        shared = None
        has_routing = config.sparsity_cluster_num_heads > 0 and config.sparsity_skip_first < config.depth
        if config.share_centroids and has_routing:
            shared = RoutingCentroids(config.sparsity_cluster_num_heads, config.sparsity_cluster_size,
                                      config.head_dim, decay=config.centroid_decay,
                                      variant=config.centroid_update)
        self.layers = nn.ModuleList(TransformerBlock(config, i, shared) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim) if config.norm == "pre" else nn.Identity()
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * depth) so the
        # residual stream's variance does not grow with depth at init.
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("attn.out", "ffn.out")) else 0.02
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def check_tokens(self, tokens) -> None:
        """Raise TypeError/ValueError for anything but (B, T) integer ids in [0, V) with T <= max_seq_len.

        The id range needs the values, hence a host sync; it is skipped while torch.compile traces
        (a data-dependent branch would break the graph) and when `validate_tokens` is False. On CUDA an
        out-of-range id would otherwise surface as a device-side assert that poisons the context.
        """
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of shape (B, T), got {type(tokens).__name__}")
        if tokens.dtype not in _TOKEN_DTYPES:
            raise TypeError(f"tokens must be int64 (or int32) token ids, got dtype {tokens.dtype}: "
                            "convert with tokens.long()")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have 2 dims (B, T), got shape {tuple(tokens.shape)}: "
                             "add a batch dim with tokens[None] for one sequence")
        B, T = tokens.shape
        if B < 1 or T < 1:
            raise ValueError(f"tokens must hold at least one sequence of one token, got shape {(B, T)}")
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds config.max_seq_len={self.config.max_seq_len}: "
                             "pass shorter sequences or build the model with a larger max_seq_len")
        if self.validate_tokens and not torch.compiler.is_compiling():
            low, high = torch.aminmax(tokens)
            low, high = int(low), int(high)
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, vocab_size={self.config.vocab_size}), got ids "
                                 f"in [{low}, {high}]: check the tokenizer against config.vocab_size")

    def forward(self, tokens: torch.Tensor, *, return_aux_loss: bool = False):
        """tokens (B, T) int64 -> logits (B, T, V); with return_aux_loss also the commitment loss.

        aux_loss = commitment_weight * sum over layers of the mean squared distance between
        LayerNorm(q) (and LayerNorm(k) when keys are separate) and its centroid: a scalar with gradient
        into the q/k projections only; zero (no grad) when no layer has routing heads.
        In training mode every forward also accumulates k-means statistics (see update_centroids).
        """
        self.check_tokens(tokens)
        x = self.embed_dropout(self.embed(tokens))
        aux = None
        for layer in self.layers:
            x, layer_aux = layer(x, compute_aux=return_aux_loss)
            if layer_aux is not None:
                aux = layer_aux if aux is None else aux + layer_aux
        logits = self.head(self.norm(x))
        if not return_aux_loss:
            return logits
        if aux is None:
            return logits, logits.new_zeros((), dtype=torch.float32)
        return logits, self.config.commitment_weight * aux

    def centroid_modules(self) -> list[RoutingCentroids]:
        """Distinct centroid sets (one per routing layer, or one in all when shared)."""
        return list({id(m): m for m in self.modules() if isinstance(m, RoutingCentroids)}.values())

    def update_centroids(self, all_reduce: AllReduce | None = None) -> int:
        """Apply the k-means statistics gathered by train-mode forwards since the last call, once.

        Call once per optimizer step after backward (any number of micro-batches before it). Shared
        centroids are updated once, with the statistics of every layer. all_reduce, e.g.
        torch.distributed.all_reduce, sums the statistics across ranks first (call it on every rank).
        No-op for centroid sets with nothing pending. Returns the number of sets updated.
        """
        return update_centroids(self.centroid_modules(), all_reduce)

    @torch.no_grad()
    def init_centroids(self, tokens: torch.Tensor, *, seed: int = 0) -> None:
        """Initialise every centroid set from data, layer by layer, with spherical k-means.

        Call once before training (the trainer does, on the first batch of a fresh run). Each routing
        layer clusters the normalised q (and k) it computes for `tokens`, so later layers see the
        earlier layers already initialised. Random unit centroids instead leave one cluster winning every
        token once a layer's queries share a direction (measured: 4 clusters, 1 used, in 3 of 4 layers of
        the tiny preset). Runs in eval mode (no statistics, no dropout) and restores the mode.
        """
        was_training = self.training
        modules = self.centroid_modules()
        for module in modules:
            module.pending_init_seed = seed
        try:
            self.eval()
            self(tokens)
        finally:
            for module in modules:
                module.pending_init_seed = None
            self.train(was_training)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameter count (tied weights counted once)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.embed.weight), None)
            params.pop(id(self.head.weight), None)
        return sum(p.numel() for p in params.values())
