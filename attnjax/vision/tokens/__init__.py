"""Vision attention modules where channels (or pixels) are the attention tokens, on feature maps
`[B, H, W, C]`.

  common.py       transposed (channel) attention and layer norm
  davit.py        channel group attention, C_g x C_g scores over all pixels, DaViT (#208,
                  arXiv:2204.03645)
  guided.py       position (P x P) and channel (C x C) attention of the guided block and its guiding
                  loss, multi-scale self-guided attention (#212, arXiv:1906.02849)
  realviformer.py squeezed transposed attention with covariance-based channel rescaling, RealViformer
                  (#235, arXiv:2407.13987)
  transdae.py     efficient spatial attention then transposed channel attention, TransDAE (#8,
                  arXiv:2409.02018)
"""

from attnjax.vision.tokens import common
from attnjax.vision.tokens import davit
from attnjax.vision.tokens import guided
from attnjax.vision.tokens import realviformer
from attnjax.vision.tokens import transdae
from attnjax.vision.tokens.davit import ChannelGroupAttention, davit_channel_group_attention
from attnjax.vision.tokens.guided import (GuidedPositionChannelAttention, channel_attention_module,
                                          guided_attention_loss, guided_position_channel_attention,
                                          position_attention_module)
from attnjax.vision.tokens.realviformer import (ImprovedChannelAttention,
                                                realviformer_channel_attention)
from attnjax.vision.tokens.transdae import (TransDAEDualAttention, efficient_attention,
                                            transdae_dual_attention)

__all__ = ["ChannelGroupAttention", "GuidedPositionChannelAttention", "ImprovedChannelAttention",
           "TransDAEDualAttention", "channel_attention_module", "common", "davit",
           "davit_channel_group_attention", "efficient_attention", "guided", "guided_attention_loss",
           "guided_position_channel_attention", "position_attention_module", "realviformer",
           "realviformer_channel_attention", "transdae", "transdae_dual_attention"]
