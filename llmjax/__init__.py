"""llmjax: Transformer language models in JAX and Flax linen."""

__version__ = "0.1.0"
