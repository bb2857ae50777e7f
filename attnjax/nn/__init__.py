"""Flax Linen layers; every attention layer takes any registered mechanism by name."""

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.blocks import MLP, Transformer, TransformerBlock, TransformerConfig
from attnjax.nn.conv_share import ConvShareAttention, ConvSharedProjection
from attnjax.nn.dual_path import ChunkPath, DualPathBlock, DualPathChunkedAttention
from attnjax.nn.folded_attention import FoldedProjectionAttention
from attnjax.nn.gau import GatedAttentionUnit, GatedCrossAttentionUnit
from attnjax.nn.localized_filtering import (CausalConv2, LocalizedFiltering,
                                           LocalizedFilteringAttention)
from attnjax.nn.location_attention import DynamicConvolutionAttention, GMMAttention
from attnjax.nn.skim import LayoutEmbedding, SkimAttention, SkimformerEncoder, SkimformerLayer
from attnjax.nn.weighted_gqa import WeightedGroupedQueryAttention

__all__ = ["CausalConv2", "ChunkPath", "ConvShareAttention", "ConvSharedProjection", "DualPathBlock",
           "DualPathChunkedAttention", "DynamicConvolutionAttention",
           "FoldedProjectionAttention", "GatedAttentionUnit", "GatedCrossAttentionUnit",
           "GMMAttention", "LayoutEmbedding", "LocalizedFiltering",
           "LocalizedFilteringAttention", "MLP", "MultiHeadAttention", "SkimAttention",
           "SkimformerEncoder", "SkimformerLayer",
           "Transformer", "TransformerBlock", "TransformerConfig", "WeightedGroupedQueryAttention"]
