"""routeformer: the Routing Transformer (Roy, Saffar, Vaswani, Grangier; TACL 2021) in PyTorch."""
from . import presets
from .config import ModelConfig
from .model import RoutingTransformerLM
from .ops import kmeans, local_attention, routing_attention
from .presets import PRESETS, Preset, get_preset

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "RoutingTransformerLM",
    "presets",
    "PRESETS",
    "Preset",
    "get_preset",
    "routing_attention",
    "local_attention",
    "kmeans",
    "__version__",
]
