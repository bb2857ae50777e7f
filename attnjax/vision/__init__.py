"""Vision attention modules: channel, spatial and convolutional attention on feature maps `[B, H, W,
C]` (and 1-D signals `[B, L, C]`), each a pure function of its input and weights with a Flax Linen
class, registered in `attnjax.modules` (`aj.list_modules(kind="feature_map")`).

  channel/   channel gates from pooled descriptors (SE, ECA, FcaNet, ELA, PKCAM, ...)
  spatial/   spatial and mixed channel-spatial attention (BAM, PSA, ULSAM, residual attention, SK)
  conv/      convolutional attention (LKA, LKCA, ParCNetV2, DAS, DiffuSSM, and Pervasive Attention
             over a (target, source) pair grid `[B, T, S, C]`)
  tokens/    channels or pixels as attention tokens (DaViT, RealViformer, TransDAE, guided attention)
"""

from attnjax.vision import channel
from attnjax.vision import conv
from attnjax.vision import spatial
from attnjax.vision import tokens

__all__ = ["channel", "conv", "spatial", "tokens"]
