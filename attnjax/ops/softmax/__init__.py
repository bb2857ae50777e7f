"""Softmax attention and the variants expressed as score/mask mods over `attnjax.core.flex`.

  cog.py            cog_attention, signed weights sign(s)e^|s| / Σ e^|s| (arXiv:2411.07176).
  dot_product.py    dot_product_attention (bias, masks, windows, packed documents, soft-capping,
                    GQA) and the `softmax` mechanism (Vaswani et al., arXiv:1706.03762).
  forgetting.py     forgetting_attention, FoX's causal softmax with forget gates (arXiv:2503.02130).
  gau.py            gated_attention_unit, GAU's relu(q·k/n)² weights (arXiv:2202.10447, 2406.15752).
  flex_variants.py  the FlexAttention paper's worked examples as mechanisms: flex, sliding_window,
                    alibi, softcap, document_masked, prefix_lm (Dong et al., arXiv:2412.05496).
  rela.py           rectified_linear_attention, ReLU scores with a gated RMSNorm (arXiv:2104.07012).
  softpick.py       softpick_attention, the rectified softmax without a sink (arXiv:2504.20966).

Importing this package registers the mechanisms.
"""

from attnjax.ops.softmax.cog import cog_attention
from attnjax.ops.softmax.dot_product import dot_product_attention, softmax_attention
from attnjax.ops.softmax.flex_variants import (alibi_attention, document_masked_attention,
                                               flex_mechanism, prefix_lm_attention,
                                               sliding_window_attention, softcap_attention)
from attnjax.ops.softmax.forgetting import forgetting_attention
from attnjax.ops.softmax.gau import gated_attention_unit
from attnjax.ops.softmax.rela import rectified_linear_attention
from attnjax.ops.softmax.softpick import softpick_attention

__all__ = ["alibi_attention", "cog_attention", "document_masked_attention", "dot_product_attention",
           "flex_mechanism", "forgetting_attention", "gated_attention_unit", "prefix_lm_attention",
           "rectified_linear_attention", "sliding_window_attention", "softcap_attention",
           "softmax_attention", "softpick_attention"]
