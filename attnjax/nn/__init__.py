"""Flax Linen layers; every attention layer takes any registered mechanism by name."""

from attnjax.nn.attention import MultiHeadAttention

__all__ = ["MultiHeadAttention"]
