"""Cross-attention modules that do not fit the sequence mechanisms' single q, k, v contract (a
learned latent array, several outputs, modality-specific inputs), each a pure function of its
inputs and weights plus a Flax Linen class, registered in `attnjax.modules`. Cross-attention that
fits the contract lives with the mechanisms (`attnjax.ops.cross`).

  perceiver.py    Perceiver (#171): latents cross-attend to a long input array, shared weights
  dual_cross.py   DCAL (#207): rollout-selected global-local and pair-wise cross-attention
  label_attention.py   LAL (#35): one learned query per label, its vector added back to every word
  multi_source.py   multi-source attention (#131): flat and hierarchical combination over encoders
  all_to_key.py     A2K (#142): region-summary and best-region attention from content to style maps
  crosslmm.py       CrossLMM (#21): pooled visual and text tokens cross-attend to all visual tokens
  bidirectional.py  NeuFA (#17): one score matrix normalized over each axis, both directions' outputs
  mixencoder.py     MixEncoder (#206): precomputed candidates' contexts read a query text encoded once
"""

from attnjax.cross import all_to_key
from attnjax.cross import bidirectional
from attnjax.cross import crosslmm
from attnjax.cross import dual_cross
from attnjax.cross import label_attention
from attnjax.cross import mixencoder
from attnjax.cross import multi_source
from attnjax.cross import perceiver
from attnjax.cross.all_to_key import AllToKeyAttention, all_to_key_attention
from attnjax.cross.bidirectional import BidirectionalSharedAttention, bidirectional_shared_attention
from attnjax.cross.crosslmm import DualCrossAttentionLayer, dual_cross_attention_layer
from attnjax.cross.dual_cross import attention_rollout, glca, pwca
from attnjax.cross.label_attention import LabelAttention
from attnjax.cross.mixencoder import MixEncoderLayer, mixencoder_light_cross_attention
from attnjax.cross.multi_source import MultiSourceAttention, multi_source_attention
from attnjax.cross.perceiver import Perceiver, fourier_features, perceiver_block

__all__ = ["AllToKeyAttention", "BidirectionalSharedAttention", "DualCrossAttentionLayer",
           "LabelAttention", "MixEncoderLayer", "MultiSourceAttention", "Perceiver", "all_to_key",
           "all_to_key_attention", "attention_rollout", "bidirectional",
           "bidirectional_shared_attention", "crosslmm", "dual_cross", "dual_cross_attention_layer",
           "fourier_features", "glca", "label_attention", "mixencoder",
           "mixencoder_light_cross_attention", "multi_source", "multi_source_attention", "perceiver",
           "perceiver_block", "pwca"]
