"""Flax Linen layers; every attention layer takes any registered mechanism by name."""

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.blocks import MLP, Transformer, TransformerBlock, TransformerConfig

__all__ = ["MLP", "MultiHeadAttention", "Transformer", "TransformerBlock", "TransformerConfig"]
