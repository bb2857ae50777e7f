"""Flax Linen layers; every attention layer takes any registered mechanism by name."""

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.blocks import MLP, Transformer, TransformerBlock, TransformerConfig
from attnjax.nn.conv_share import ConvShareAttention, ConvSharedProjection
from attnjax.nn.folded_attention import FoldedProjectionAttention
from attnjax.nn.gau import GatedAttentionUnit, GatedCrossAttentionUnit

__all__ = ["ConvShareAttention", "ConvSharedProjection", "FoldedProjectionAttention",
           "GatedAttentionUnit", "GatedCrossAttentionUnit", "MLP", "MultiHeadAttention",
           "Transformer", "TransformerBlock", "TransformerConfig"]
