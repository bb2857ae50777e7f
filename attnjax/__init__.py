"""attnjax: attention mechanisms from the literature as pure JAX operators, fast kernels and Flax
layers.

Table of contents (re-exports only). See docs/DESIGN.md for the operator contract and
`aj.list_mechanisms()` for what is registered.
"""

from attnjax import catalog
from attnjax import nn
from attnjax.core import masks
from attnjax.core.block_mask import BlockMask, create_block_mask
from attnjax.core.flex import attention_weights, flex_attention
from attnjax.core.merge import merge_attention_states
from attnjax.core.linear import gated_linear_attention, gated_linear_attention_step
from attnjax.core.normalizers import Normalizer, get_normalizer, register_normalizer
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import Mechanism, ParamSpec, TokenInput, attention, list_mechanisms
from attnjax.registry import get as get_mechanism
from attnjax.modules import Module, get_module, list_modules

__version__ = "0.1.0"

__all__ = [
    "BlockMask", "Mechanism", "Module", "Normalizer", "ParamSpec", "TokenInput", "attention",
    "attention_weights", "catalog", "create_block_mask",
    "dot_product_attention", "flex_attention", "gated_linear_attention",
    "gated_linear_attention_step", "get_mechanism", "get_module", "get_normalizer", "list_mechanisms",
    "list_modules", "masks",
    "merge_attention_states", "nn", "register_normalizer",
]
