"""Array type aliases and the dimension-letter legend shared by every operator.

Letters follow `jax.nn.dot_product_attention`:

  B  batch                       T  query length          S  key/value length
  N  query heads                 K  key/value heads (GQA when K divides N; G = N // K)
  H  query/key head dim          h  value head dim

Operators take `q: [B, T, N, H]`, `k: [B, S, K, H]`, `v: [B, S, K, h]` and return `[B, T, N, h]`.
Recurrent states are `[B, N, H, h]` (`State`). Annotations use jaxtyping so shapes read in the signature.
"""

from collections.abc import Callable

import jax
from jaxtyping import Array, Bool, Float, Int, Shaped

Query = Float[Array, "B T N H"]
Key = Float[Array, "B S K H"]
Value = Float[Array, "B S K h"]
Output = Float[Array, "B T N h"]
LogSumExp = Float[Array, "B T N"]
# One decoding step's token (no time axis).
TokenQuery = Float[Array, "B N H"]
TokenKey = Float[Array, "B K H"]
TokenValue = Float[Array, "B K h"]
TokenOutput = Float[Array, "B N h"]
# A linear-attention state [B, N, H, h] (h + 1 columns when it carries the normalizer: `_hv` is named
# for the reader and not checked).
State = Float[Array, "B N H _hv"]
# Per-token arrays besides q, k, v (`registry.TokenInput`): one number per token and query head (a
# forget gate, a head gate), or one entry of any dtype per token (token types, masks, pitches).
QueryHeadScalars = Float[Array, "B T N"]
KeyHeadScalars = Float[Array, "B S N"]
PerQueryToken = Shaped[Array, "B T"]
PerKeyToken = Shaped[Array, "B S"]
SegmentIds = Int[Array, "B L"]
Lengths = Int[Array, "B"]
# A paged KV cache: a pool of P pages of `page_size` tokens, and each row's page numbers in order.
KeyPages = Float[Array, "P page_size K H"]
ValuePages = Float[Array, "P page_size K h"]
PageTable = Int[Array, "B max_pages"]

# mask_mod(b, n, q_idx, kv_idx) -> bool, on broadcastable integer index arrays. True keeps the pair.
MaskMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# score_mod(score, b, n, q_idx, kv_idx) -> score, elementwise on the scaled logits.
ScoreMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

__all__ = ["Array", "Bool", "Float", "Int", "Query", "Key", "Value", "Output", "LogSumExp", "State",
           "TokenQuery", "TokenKey", "TokenValue", "TokenOutput",
           "QueryHeadScalars", "KeyHeadScalars", "PerQueryToken", "PerKeyToken",
           "SegmentIds", "Lengths", "KeyPages", "ValuePages", "PageTable", "MaskMod", "ScoreMod",
           "Shaped"]
