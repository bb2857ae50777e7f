"""Vision attention modules (spatial and mixed channel-spatial attention):

  aan.py                 #55  attention in attention block, A²N (arXiv:2104.09497)
  bam.py                 #11  BAM balanced attention for super-resolution (arXiv:2104.07566)
  psa.py                 #58  polarized self-attention, parallel / sequential (arXiv:2107.00782)
  residual_attention.py  #130 residual attention module (arXiv:1704.06904)
  selective_kernel.py    #127 selective kernel attention (arXiv:2204.01005)
  ulsam.py               #111 ULSAM subspace attention (arXiv:2006.15102)
"""

from attnjax.vision.spatial import aan
from attnjax.vision.spatial import bam
from attnjax.vision.spatial import psa
from attnjax.vision.spatial import residual_attention
from attnjax.vision.spatial import selective_kernel
from attnjax.vision.spatial import ulsam
from attnjax.vision.spatial.aan import AttentionInAttentionBlock
from attnjax.vision.spatial.aan import attention_in_attention_block
from attnjax.vision.spatial.bam import BalancedAttention
from attnjax.vision.spatial.bam import balanced_attention_module
from attnjax.vision.spatial.psa import PolarizedSelfAttention
from attnjax.vision.spatial.psa import polarized_self_attention
from attnjax.vision.spatial.residual_attention import ResidualAttention
from attnjax.vision.spatial.residual_attention import residual_attention_module
from attnjax.vision.spatial.selective_kernel import SelectiveKernelAttention
from attnjax.vision.spatial.selective_kernel import selective_kernel_attention
from attnjax.vision.spatial.ulsam import SubspaceAttention
from attnjax.vision.spatial.ulsam import ulsam_subspace_attention

__all__ = ["aan", "bam", "psa", "residual_attention", "selective_kernel", "ulsam",
           "AttentionInAttentionBlock", "attention_in_attention_block", "BalancedAttention",
           "balanced_attention_module", "PolarizedSelfAttention", "polarized_self_attention",
           "ResidualAttention", "residual_attention_module", "SelectiveKernelAttention",
           "selective_kernel_attention", "SubspaceAttention", "ulsam_subspace_attention"]
