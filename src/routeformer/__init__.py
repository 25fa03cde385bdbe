"""routeformer: the Routing Transformer (Roy, Saffar, Vaswani, Grangier; TACL 2021) in PyTorch."""
from .ops import kmeans, local_attention, routing_attention

__version__ = "0.1.0"

__all__ = ["routing_attention", "local_attention", "kmeans", "__version__"]
