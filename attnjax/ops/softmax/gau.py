"""The attention of the gated attention unit (GAU): squared-ReLU weights scaled by the length.

    s_ij = scale · q_i·k_j                                            (scale: 1 unless given)
    a_ij = relu(s_ij / n_i + b_{j - p_i})²                            (no normalization over keys)
    o_i  = Σ_j a_ij v_j

`n_i` is the paper's length n: the number of keys query i sees. Hua et al.'s pseudo-code (Code 1 of
arXiv:2202.10447, `kernel = square(relu(qk / seq_len + bias))`) divides by the sequence length, which
is the visible-key count of every row of a bidirectional self-attention (and of a padded row: its
`kv_lengths`). For causal rows this file follows Mega and TacoLM, the code the catalog row comes
from (`MovingAverageGatedAttention.element_attention` of github.com/Ereboas/TacoLM: `lengths =
attn_mask.sum(-1)` with the lower-triangular 0/1 mask), where row i divides by its own count i + 1:
the weights of a row then never depend on later tokens, and decoding over a KV cache equals the full
forward. `length=n` fixes n instead (the pseudo-code's causal form with the training length, as
FLASH's quadratic part divides by its fixed group size). `b` is an optional learned relative
position bias `relative_bias [2L - 1]`, `b_d = relative_bias[L - 1 + d]` for the key-minus-query
distance d (clipped to ±(L - 1)), Mega's `SimpleRelativePositionalBias`; p_i = q_offset + i is the
query's absolute position. There is no 1/sqrt(H) (`scale=None` means 1; a given `scale` multiplies
q·k before the 1/n).

Streamable on flex attention: `n_i` comes from one flex pass over zero-width stand-ins of q, k under
the same masks (a softmax of all-zero scores has log-sum-exp log n_i), then the weights are a
`score_mod` reading 1/n_i (and b) with the unnormalized `relu_squared` normalizer registered here, so
the `xla` path with block skipping serves both passes. A row with no visible key gives zeros.

`activation="softmax"` is the other weight function of the same code (Mega/TacoLM's
`attention_activation="softmax"`, TacoLM's default run): `softmax(scale · q_i·k_j + b)` with the
usual `scale = H^-1/2` and no 1/n.

The whole GAU (U, V, Z projections, per-dim scale and offset of Z, the gate U ⊙ A V, output
projection) is the Flax layer `attnjax.nn.GatedAttentionUnit`; TacoLM's gated cross-attention is
`attnjax.nn.GatedCrossAttentionUnit`. In a `MultiHeadAttention` layer this mechanism runs the GAU
weights per head on projected q, k, v.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `relative_bias [2L-1]` → `[B,T,N,h]`.
Papers: Hua, Dai, Liu and Le, "Transformer Quality in Linear Time", arXiv:2202.10447 (GAU); Song et
al., "TacoLM: GaTed Attention Equipped Codec Language Model are Efficient Zero-Shot Text to Speech
Synthesizers", arXiv:2406.15752; Ma et al., "Mega: Moving Average Equipped Gated Attention",
arXiv:2209.10655.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract, visible_key_counts
from attnjax.core.normalizers import Normalizer, register_normalizer
from attnjax.registry import Mechanism, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["gated_attention_unit", "RELU_SQUARED", "ACTIVATIONS"]

ACTIVATIONS = ("relu2", "softmax")
# Shapes in the signatures (letters of `attnjax.typing`; R = 2L - 1 relative distances).
RelativeBias = Float[Array, "R"]

# Unnormalized squared-ReLU weights relu(s)² (the shift m is unused: no normalization).
RELU_SQUARED = register_normalizer(Normalizer(
    "relu_squared", weight=lambda s, m: jnp.square(jax.nn.relu(s)), normalized=False))


def gated_attention_unit(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                         q_offset=0, kv_lengths: Optional[Lengths] = None,
                         scale: Optional[float] = None, implementation: Optional[str] = None,
                         length: Optional[int] = None,
                         relative_bias: Optional[RelativeBias] = None,
                         activation: str = "relu2") -> Output:
  """GAU attention (see the module docstring): relu(q·k / n_i + b)² weights, unnormalized."""
  op = "gated_attention_unit"
  B = checks.check_qkv(op, q, k, v)[0]
  if activation not in ACTIVATIONS:
    raise ValueError(f"{op}: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
  if length is not None and (isinstance(length, bool) or int(length) != length or length <= 0):
    raise ValueError(f"{op}: `length` must be a positive int (the fixed n of 1/n) or None, "
                     f"got {length!r}")
  if relative_bias is not None and (jnp.ndim(relative_bias) != 1 or relative_bias.shape[0] % 2 == 0):
    raise ValueError(f"{op}: `relative_bias` must have shape [2L - 1] (an odd length: distances "
                     f"-(L-1) ... L-1), got shape {jnp.shape(relative_bias)}")
  call = lambda **kw: flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                         q_offset=q_offset, kv_lengths=kv_lengths,
                                         implementation=implementation, **kw)
  off = jnp.asarray(q_offset, jnp.int32)
  table = None if relative_bias is None else jnp.asarray(relative_bias, jnp.float32)
  if off.ndim == 1:
    checks.check_shape(op, "q_offset", off, (B,), "[B]")

  def bias(b, qi, ki):
    # Key-minus-query distance of absolute positions, clipped into the table (Mega's simple bias).
    reach = (table.shape[0] - 1) // 2
    pos = (off[b] if off.ndim == 1 else off) + qi
    return table[jnp.clip(ki - pos, -reach, reach) + reach]

  if activation == "softmax":
    score_mod = None if relative_bias is None else (
        lambda s, b, n, qi, ki: s + bias(b, qi, ki))
    return call(score_mod=score_mod, scale=scale)

  if length is not None:
    inv_n = None
  else:
    counts = visible_key_counts(op, q, k, causal=causal, segment_ids=segment_ids,
                                q_offset=q_offset, kv_lengths=kv_lengths,
                                implementation=implementation)
    inv_n = jnp.where(counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)      # [B, T]

  def score_mod(s, b, n, qi, ki):
    # Indices broadcast as [B, ., ., T, .]: b batch, qi query row, ki key slot.
    s = s / length if inv_n is None else s * inv_n[b, qi]
    return s if relative_bias is None else s + bias(b, qi, ki)

  return call(score_mod=score_mod, scale=1.0 if scale is None else scale,
              normalizer=RELU_SQUARED)


register(Mechanism(
    name="gated_attention_unit", fn=gated_attention_unit, family="softmax-variant", seeds=(226,),
    paper="TacoLM: GaTed Attention Equipped Codec Language Model are Efficient Zero-Shot Text to "
          "Speech Synthesizers (GAU: Transformer Quality in Linear Time, arXiv:2202.10447)",
    arxiv="2406.15752"))
