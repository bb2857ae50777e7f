"""Flax Linen layers; every attention layer takes any registered mechanism by name."""

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.blocks import MLP, Transformer, TransformerBlock, TransformerConfig
from attnjax.nn.conv_share import ConvShareAttention, ConvSharedProjection
from attnjax.nn.folded_attention import FoldedProjectionAttention
from attnjax.nn.gau import GatedAttentionUnit, GatedCrossAttentionUnit
from attnjax.nn.location_attention import DynamicConvolutionAttention, GMMAttention
from attnjax.nn.skim import LayoutEmbedding, SkimAttention, SkimformerEncoder, SkimformerLayer

__all__ = ["ConvShareAttention", "ConvSharedProjection", "DynamicConvolutionAttention",
           "FoldedProjectionAttention", "GatedAttentionUnit", "GatedCrossAttentionUnit",
           "GMMAttention", "LayoutEmbedding", "MLP", "MultiHeadAttention", "SkimAttention",
           "SkimformerEncoder", "SkimformerLayer",
           "Transformer", "TransformerBlock", "TransformerConfig"]
