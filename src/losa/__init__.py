"""losa: prune Hugging Face causal LMs and recover them with dynamic low-rank sparse adaptation."""

__version__ = "0.1.0"
