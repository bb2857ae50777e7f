"""Convolutional attention on feature maps `[B, H, W, C]`: large and oversized convolutions,
deformable gates and state-space mixers standing in for spatial self-attention.

  lka.py      large kernel attention, VAN's decomposed 21×21 kernel (#60, arXiv:2202.09741)
  lkca.py     one large depthwise convolution as a static local attention (#88, arXiv:2401.05738)
  parcnet.py  oversized depthwise convolution in a bifurcate gate, ParCNetV2 (#182, arXiv:2211.07157)
  pervasive.py  masked 2-D DenseNet over a (target, source) grid, Pervasive Attention (#115,
              arXiv:1808.03867; kind "pair", the sequence model is arch "pervasive")
  das.py      deformable convolution giving a sigmoid saliency gate, DAS (#120, arXiv:2311.12091)
  diffussm.py gated bidirectional SSM in an hourglass, DiffuSSM (#149, arXiv:2311.18257; built and
              tested, not registered: see the catalog note on row 149)
"""

from attnjax.vision.conv import das
from attnjax.vision.conv import diffussm
from attnjax.vision.conv import lka
from attnjax.vision.conv import lkca
from attnjax.vision.conv import parcnet
from attnjax.vision.conv import pervasive
from attnjax.vision.conv.das import (DeformableAttentionGate, bilinear_sample,
                                     deformable_attention_gate, deformable_conv2d)
from attnjax.vision.conv.diffussm import DiffuSSMBlock, bidirectional_ssm, diffussm_block
from attnjax.vision.conv.lka import (LargeKernelAttention, large_kernel_attention, lka_kernel_sizes,
                                     lka_receptive_field)
from attnjax.vision.conv.lkca import (LargeKernelConvAttention, large_kernel_conv_attention,
                                      lkca_attention_matrix)
from attnjax.vision.conv.parcnet import (OversizedConvBifurcateGate, oversized_conv,
                                         oversized_conv_bifurcate_gate)
from attnjax.vision.conv.pervasive import (PervasiveAttention, pervasive_attention, pervasive_grid,
                                           pervasive_layer_count)

__all__ = ["DeformableAttentionGate", "DiffuSSMBlock", "LargeKernelAttention",
           "LargeKernelConvAttention", "OversizedConvBifurcateGate", "PervasiveAttention",
           "bidirectional_ssm",
           "bilinear_sample", "das", "deformable_attention_gate", "deformable_conv2d", "diffussm",
           "diffussm_block", "large_kernel_attention", "large_kernel_conv_attention", "lka",
           "lka_kernel_sizes", "lka_receptive_field", "lkca", "lkca_attention_matrix",
           "oversized_conv", "oversized_conv_bifurcate_gate", "parcnet", "pervasive",
           "pervasive_attention", "pervasive_grid", "pervasive_layer_count"]
