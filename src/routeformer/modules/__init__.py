"""nn.Modules: parameters and buffers around the functional ops."""
from .attention import LocalAttention, MixedAttention, RoutingAttention
from .block import FeedForward, TransformerBlock
from .centroids import RoutingCentroids, update_centroids
from .rotary import RotaryEmbedding

__all__ = [
    "LocalAttention",
    "RoutingAttention",
    "MixedAttention",
    "FeedForward",
    "TransformerBlock",
    "RoutingCentroids",
    "update_centroids",
    "RotaryEmbedding",
]
