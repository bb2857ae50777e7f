"""Channel attention on feature maps `[B, H, W, C]`: a gate per channel from pooled descriptors.

  se.py    squeeze-and-excitation, the baseline gate (arXiv:1709.01507)
  eca.py   ECA: a 1-D convolution across channels, kernel size adapted to C (#188, arXiv:1910.03151)
  fca.py   FcaNet: SE pooled by 2-D DCT components, one frequency per channel group (#32,
           arXiv:2012.11879)
  ela.py   ELA: strip-pooled positional gates along H and W, shared 1-D conv + GroupNorm, no channel
           reduction (#50, arXiv:2403.01123)
  afilm.py AFiLM: block max-pooling, a transformer across blocks, per-block feature scales on 1-D
           signals (#107, arXiv:2108.11637)
  pkcam.py PKCAM: an ECA gate fused with one on the current + previous layer's descriptors (#204,
           arXiv:2211.07521)
  cape.py  CAPE: channel attention from the PDE parameters on three convolution branches (one of
           them spectral) of a PDE surrogate's input field (#103, arXiv:2304.14118)
"""

from attnjax.vision.channel import afilm
from attnjax.vision.channel import cape
from attnjax.vision.channel import eca
from attnjax.vision.channel import ela
from attnjax.vision.channel import fca
from attnjax.vision.channel import pkcam
from attnjax.vision.channel import se
from attnjax.vision.channel.afilm import AttentionFiLM, attention_film, block_max_pool
from attnjax.vision.channel.cape import (CAPEParameterAttention, pde_parameter_channel_attention,
                                         spectral_conv2d)
from attnjax.vision.channel.eca import EfficientChannelAttention, eca_channel_attention, eca_kernel_size
from attnjax.vision.channel.ela import ELA_VARIANTS, EfficientLocalAttention, ela_local_attention
from attnjax.vision.channel.fca import (FrequencyChannelAttention, dct_basis, fca_channel_attention,
                                        fca_frequencies)
from attnjax.vision.channel.pkcam import PreviousKnowledgeChannelAttention, pkcam_channel_attention
from attnjax.vision.channel.se import SqueezeExcitation, excitation, squeeze_excitation

__all__ = ["AttentionFiLM", "CAPEParameterAttention", "ELA_VARIANTS", "EfficientChannelAttention",
           "EfficientLocalAttention", "FrequencyChannelAttention", "PreviousKnowledgeChannelAttention",
           "SqueezeExcitation", "afilm", "attention_film", "block_max_pool", "cape", "dct_basis",
           "eca", "eca_channel_attention", "eca_kernel_size", "ela", "ela_local_attention",
           "excitation", "fca", "fca_channel_attention", "fca_frequencies",
           "pde_parameter_channel_attention", "pkcam", "pkcam_channel_attention", "se",
           "spectral_conv2d", "squeeze_excitation"]
