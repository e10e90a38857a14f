"""owq: OWQ quantization, weak-column tuning and multi-adapter serving of causal LMs."""

__version__ = "0.1.0"
