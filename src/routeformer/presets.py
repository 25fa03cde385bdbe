"""Named presets as data: the paper's configurations, the authors' hparam sets, and `tiny` for CPU.

Sources, cited per preset:
- AUTHORS: google-research/google-research, routing_transformer/sparse_transformer.py (text) and
  sparse_image_transformer.py (images), the named @registry.register_hparams function; T2T defaults
  they inherit come from tensor2tensor common_hparams.basic_params1 (post-LN "none"/"dan",
  layer_prepostprocess_dropout 0.1).
- PAPER: Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers", TACL 2021
  (arXiv 2003.05997). Only the abstract's headline numbers could be checked while writing this file;
  the paper-named presets therefore take their model numbers from the authors' hparams function
  released for that experiment, and say so.

What ModelConfig cannot express is listed in each source string rather than silently dropped:
attention dropout and a separate FFN dropout (one `dropout` knob holds the residual dropout), the
authors' target (token) dropout, factorised embeddings (embedding_dims < hidden_size), relative
positions inside routing heads, and the image models' learned absolute/channel embeddings.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field

from .config import ModelConfig

DATASETS = ("enwik8", "text8", "wikitext103", "wikitext103_bytes", "pg19", "cifar10", "imagenet64", "stdlib")
TRAIN_KEYS = ("optimizer", "learning_rate", "warmup_steps", "schedule", "batch_size", "seq_len", "max_steps",
              "weight_decay", "grad_clip", "grad_accum")

WIKITEXT103_WORD_VOCAB = 267_735  # word-level vocabulary, Merity et al. 2016 (as used by the paper)
# The authors' PG-19 checkpoint README calls its subword vocabulary "vocab98K" (file
# vocab.pg19_length8k.32768.subwords; problems/pg19.py asks T2T for approx_vocab_size 2**15). The exact
# entry count is not published there: 98_000 is that label, not a measured size.
PG19_SUBWORD_VOCAB = 98_000


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    dataset: str
    train: dict = field(default_factory=dict)
    source: str = ""


# T2T schedule "constant*rsqrt_normalized_decay": lr = 0.01 * sqrt(warmup / max(step, warmup)), i.e.
# constant for the first 10k steps, then 1/sqrt(step) decay (no linear warm-up). Adafactor with
# beta1=0, beta2=0.999, decay "pow" 0.8, clipping threshold 1.0, parameter-scale on; clip_grad_norm=0
# (no clipping). T2T batch_size counts tokens per TPU core (= one sequence); the core count is not in
# the code, so batch_size is left out.
_AUTHORS_TRAIN = {"optimizer": "adafactor", "learning_rate": 0.01, "schedule": "rsqrt", "warmup_steps": 10_000,
                  "weight_decay": 0.0}
_TEXT_DEFAULTS = "post-LN and residual dropout 0.1 are the T2T basic_params1 defaults they inherit"


def _text(depth, dim, local, routing, clusters, window, ffn_hidden, seq_len, vocab, skip_first=0,
          dropout=0.1, **extra) -> ModelConfig:
    heads = local + routing
    return ModelConfig(
        vocab_size=vocab, dim=dim, depth=depth, heads=heads, max_seq_len=seq_len, causal=True,
        local_num_heads=local, query_shape=256, memory_flange=256, sparsity_cluster_size=clusters,
        sparsity_cluster_attention_window=window, sparsity_skip_first=skip_first, share_qk=True,
        qk_layernorm=True, position="shaw", max_relative_distance=513, norm="post", ffn="geglu",
        ffn_mult=ffn_hidden / dim, dropout=dropout, tie_embeddings=True, centroid_update="ratio",
        centroid_decay=0.999, commitment_weight=1e-4, **extra)


def _image(depth, dim, local, routing, clusters, window, seq_len) -> ModelConfig:
    return ModelConfig(
        vocab_size=256, dim=dim, depth=depth, heads=local + routing, max_seq_len=seq_len, causal=True,
        local_num_heads=local, query_shape=256, memory_flange=256, sparsity_cluster_size=clusters,
        sparsity_cluster_attention_window=window, share_qk=True, qk_layernorm=True, position="shaw",
        norm="post", ffn="relu", ffn_mult=2048 / dim, dropout=0.3, tie_embeddings=False,
        centroid_update="ratio", centroid_decay=0.999, commitment_weight=1e-4)


_ENWIK8 = _text(12, 1024, 4, 4, 16, 512, 3072, 8192, 256)
_WIKITEXT = _text(14, 1024, 8, 8, 8, 512, 3072, 4096, WIKITEXT103_WORD_VOCAB)
_PG19_CLUSTER = _text(22, 1032, 6, 2, 16, 512, 4096, 8192, PG19_SUBWORD_VOCAB, skip_first=21)
_PG19_LOCAL = _text(24, 1032, 8, 0, 16, 512, 4096, 8192, PG19_SUBWORD_VOCAB, skip_first=21)
_CIFAR10 = _image(12, 1024, 4, 4, 6, 512, 3072)
_IMAGENET = _image(24, 1024, 12, 4, 8, 2048, 64 * 64 * 3)

_SRC_ENWIK8 = (
    "AUTHORS sparse_transformer.py enwik8_local_cluster8k (over enwik8_local8k): hidden 1024, 12 layers, "
    "4 local + 4 routing heads, 16 clusters, window 512, query_shape/memory_flange 256, "
    "max_relative_position 513, geglu filter 3072, length 8192, share_qk; " + _TEXT_DEFAULTS + ".")
_SRC_WIKITEXT = (
    "AUTHORS sparse_transformer.py wikitext103_local_cluster4k (over wikitext103_local4k): hidden 1024, "
    "14 layers, 8 local + 8 routing heads, 8 clusters, window 512, query_shape/memory_flange 256, "
    "max_relative_position 513, geglu filter 3072, length 4096, weight_decay 2e-5, share_qk; "
    + _TEXT_DEFAULTS + ". Not representable: embedding_dims 256 (factorised embedding), "
    "attention/relu/embedding dropout 0.4, target dropout 0.25.")
_SRC_PG19 = (
    "AUTHORS sparse_transformer.py pg19_local_cluster8k: hidden 1032, 22 layers, 6 local + 2 routing heads, "
    "sparsity_skip_first 21 (routing only in the last layer), 16 clusters, window 512, query_shape/"
    "memory_flange 256, max_relative_position 513, geglu filter 4096, length 8192, dropouts 0, weight_decay "
    "0; " + _TEXT_DEFAULTS + ". Vocab: README 'vocab98K' (exact size not published; 98000 is the label). "
    "Head dim 1032 / 8 = 129 exceeds the Triton routing kernels' 128, so on GPU its routing heads run the "
    "PyTorch reference; --set model.head_dim=128 trades fidelity for the fast path.")
_AUTH_NOTE = " Relative positions in routing heads (sparsity_cluster_relative) are not supported here."

_AUTHORS = {
    "enwik8_local_cluster8k": Preset(
        "enwik8_local_cluster8k", _ENWIK8, "enwik8", {**_AUTHORS_TRAIN, "seq_len": 8192},
        _SRC_ENWIK8 + _AUTH_NOTE),
    "wikitext103_local_cluster4k": Preset(
        "wikitext103_local_cluster4k", _WIKITEXT, "wikitext103",
        {**_AUTHORS_TRAIN, "seq_len": 4096, "weight_decay": 2e-5}, _SRC_WIKITEXT + _AUTH_NOTE),
    "pg19_local_cluster8k": Preset(
        "pg19_local_cluster8k", _PG19_CLUSTER, "pg19", {**_AUTHORS_TRAIN, "seq_len": 8192},
        _SRC_PG19 + _AUTH_NOTE),
    "pg19_local8k": Preset(
        "pg19_local8k", _PG19_LOCAL, "pg19", {**_AUTHORS_TRAIN, "seq_len": 8192},
        "AUTHORS sparse_transformer.py pg19_local8k: pg19_local_cluster8k with 8 local heads, 0 routing heads, "
        "24 layers (all-local baseline). " + _SRC_PG19.split(": ", 1)[1]),
    "cifar10_local_cluster": Preset(
        "cifar10_local_cluster", _CIFAR10, "cifar10", {**_AUTHORS_TRAIN, "seq_len": 3072},
        "AUTHORS sparse_image_transformer.py cifar10_local_cluster (over cifar10_local1d, "
        "sparse_imagetransformer_base): hidden 1024, 12 layers, 4 local + 4 routing heads, 6 clusters, window "
        "512, query_shape/memory_flange 256, relu FFN filter 2048, post-LN ('none'/'dan'), "
        "layer_prepostprocess_dropout 0.3, share_qk, untied output layer, length 32*32*3. Not representable: "
        "the authors' per-channel embeddings and learned absolute positional embeddings (no relative "
        "positions there); Shaw relative positions in local heads stand in for them."),
    "imagenet_local_cluster": Preset(
        "imagenet_local_cluster", _IMAGENET, "imagenet64", {**_AUTHORS_TRAIN, "seq_len": 64 * 64 * 3},
        "AUTHORS sparse_image_transformer.py imagenet_local_cluster (over imagenet_local1d): hidden 1024, "
        "24 layers, 12 local + 4 routing heads, 8 clusters, window 2048, query_shape/memory_flange 256, relu "
        "FFN filter 2048, post-LN, layer_prepostprocess_dropout 0.3, share_qk, length 64*64*3. Same "
        "embedding caveat as cifar10_local_cluster."),
}

_PAPER_FROM = {
    "enwik8": ("enwik8_local_cluster8k", "PAPER enwik8 character-level experiment (12-layer model, length 8192); "
               "the paper's table could not be checked here, so no result is quoted"),
    "wikitext103": ("wikitext103_local_cluster4k", "PAPER Wikitext-103: 15.8 test perplexity (abstract)"),
    "pg19": ("pg19_local_cluster8k", "PAPER PG-19: 33.2 test perplexity, 22 layers, length 8192 (abstract)"),
    "cifar10": ("cifar10_local_cluster", "PAPER CIFAR-10 ablation (length 3072); the paper's table could not "
                "be checked here, so no result is quoted"),
    "imagenet64": ("imagenet_local_cluster", "PAPER ImageNet-64: 3.43 bits/dim (abstract)"),
}

_PAPER = {
    name: Preset(name, _AUTHORS[base].model, _AUTHORS[base].dataset, _AUTHORS[base].train,
                 f"{claim}. Model numbers from the authors' release: {_AUTHORS[base].source}")
    for name, (base, claim) in _PAPER_FROM.items()
}

_TINY = Preset(
    "tiny",
    ModelConfig(vocab_size=256, dim=128, depth=4, heads=4, max_seq_len=512, local_num_heads=2, query_shape=64,
                memory_flange=64, sparsity_cluster_size=4, sparsity_cluster_attention_window=64,
                position="shaw", max_relative_distance=128, norm="pre", ffn="relu", ffn_mult=4.0),
    "stdlib",
    {"optimizer": "adamw", "learning_rate": 1e-3, "schedule": "cosine", "warmup_steps": 20, "batch_size": 8,
     "seq_len": 256, "max_steps": 600, "weight_decay": 0.01, "grad_clip": 1.0, "grad_accum": 1},
    "ours: a byte-level CPU model (0.86M parameters, ~0.17 s per step of 8 x 256 tokens on 2 CPU cores, so "
    "600 steps take about 2 minutes and show a clearly falling loss); not from the paper.")

PRESETS: dict[str, Preset] = {**_PAPER, **_AUTHORS, "tiny": _TINY}


def get_preset(name: str) -> Preset:
    """A copy of the named preset (editing it leaves the registry alone); unknown name: ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"preset name must be a str, got {type(name).__name__}")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"unknown preset {name!r}: {hint}known presets: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    return dataclasses.replace(preset, model=copy.deepcopy(preset.model), train=dict(preset.train))
