"""A shallow feed-forward network over the flattened sequence, in place of attention.

Paper: Bozic et al., "Rethinking Attention: Exploring Shallow Feed-Forward Neural Networks as an
Alternative to Attention Layers in Transformers", arXiv:2311.10642 (catalog #80).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core import implementations
from attnjax.core import mixing
from attnjax.core.mixing import DEFAULT_MAX_LENGTH, MixerInputs, precise_einsum
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["FFN_HIDDEN", "ffn_attention_replacement"]

_F32 = jnp.float32
FFN_HIDDEN = 64              # hidden width of the shallow FFN, per head
# Maximum length L and hidden width M of the example's FFN (example settings: the conformance
# sequences fit L).
EXAMPLE_MAX_LENGTH = 32
EXAMPLE_HIDDEN = 16

# Shapes in the signature (jaxtyping; letters of `attnjax.typing`, plus L the maximum length and M
# the hidden width).
InWeights = Float[Array, "L N h M"]
InBias = Float[Array, "N M"]
OutWeights = Float[Array, "L N M h"]
OutBias = Float[Array, "L N h"]


def ffn_attention_replacement(q: Query, k: Key, v: Value, *,
                              ffn_in: InWeights, ffn_in_bias: InBias, ffn_out: OutWeights,
                              ffn_out_bias: OutBias,
                              causal: bool = False, segment_ids: Optional[SegmentIds] = None,
                              q_offset=0, kv_lengths: Optional[Lengths] = None,
                              scale: Optional[float] = None,
                              implementation: Optional[str] = None) -> Output:
  """Shallow FFN over the flattened, zero-padded sequence, in place of attention (per head).

      z = ReLU(flatten(v_1 … v_L) W_1 + b_1)      W_1: [L·h, M]   (padding, masked tokens = 0)
      y = z W_2 + b_2,  read at the query's row     W_2: [M, L·h]

  with L the fixed maximum length. Causal (the decoder form): the output at t is row t of the FFN
  applied to the sequence with tokens after t masked to zero. Since the first layer is linear in the
  masked input, z_t = ReLU(Σ_{j<=t} v_j W_1[j] + b_1) is a cumulative sum, so every causal row
  costs O(M·h) on top of one O(T·h·M) pass ("xla"); "reference" builds each query's masked,
  flattened input explicitly and applies the FFN to it.

  Paper: Bozic et al., "Rethinking Attention: Exploring Shallow Feed-Forward Neural Networks as an
  Alternative to Attention Layers in Transformers", arXiv:2311.10642 (the separate-heads
  replacement: one FFN per head). The paper's FFN reads the layer input x, one stream; here that
  stream is each head's values v (`reads={"v"}`: q and k are not read, and the layer creates no
  projection for them). Trained end to end here, as any learned mixer: the paper's procedure of
  distilling each FFN from a trained attention layer's outputs is not implemented. The authors'
  code also puts a LayerNorm before each linear layer, uses LeakyReLU, and in the decoder shares
  one output layer across rows; here the FFN is the plain two-layer ReLU network above.

  Args:
    q: `[B, T, N, H]`, k: `[B, S, K, H]`: not read (shapes only). v: `[B, S, K, h]`.
    ffn_in: `[L, N, h, M]` W_1 (rows of the flattened input by position), ffn_in_bias: `[N, M]`.
    ffn_out: `[L, N, M, h]` W_2 (output columns by position), ffn_out_bias: `[L, N, h]`.
    causal: mask tokens after each query.
    segment_ids, q_offset, kv_lengths: the common contract (packed runs are each placed at position
      0 of their own padded input; a KV cache gives the rows of the full forward).
    scale: must be None (no scores). implementation: "xla" (cumulative sums) or "reference" (the
      FFN on each query's explicitly masked, flattened input).

  Returns:
    `[B, T, N, h]` in q's dtype; a row with no visible token is zero.
  """
  op = "ffn_attention_replacement"
  p = mixing.prepare_mixer_inputs(op, q, k, v, segment_ids=segment_ids, q_offset=q_offset,
                                  kv_lengths=kv_lengths, scale=scale, decode=causal)
  _, _, S, N, _, _, h = p.dims
  if jnp.ndim(ffn_in) != 4:
    raise ValueError(f"{op}: `ffn_in` must have shape [L, N, h, M], got {jnp.shape(ffn_in)}")
  L, M = ffn_in.shape[0], ffn_in.shape[3]
  w1 = mixing.check_param(op, "ffn_in", ffn_in, (L, N, h, M), "[L, N, h, M]")
  b1 = mixing.check_param(op, "ffn_in_bias", ffn_in_bias, (N, M), "[N, M]")
  w2 = mixing.check_param(op, "ffn_out", ffn_out, (L, N, M, h), "[L, N, M, h]")
  b2 = mixing.check_param(op, "ffn_out_bias", ffn_out_bias, (L, N, h), "[L, N, h]")
  mixing.check_max_length(op, "ffn_in", w1, S)
  out = implementations.dispatch(op, _IMPLEMENTATIONS, implementation, p, w1, b1, w2, b2, causal)
  return out.astype(q.dtype)


def _ffn_xla(p: MixerInputs, w1, b1, w2, b2, causal):
  S = p.v.shape[1]
  if p.segmented:
    contrib = precise_einsum("bsnc,bsncm->bsnm", p.v, w1[p.pos])
  else:
    contrib = precise_einsum("bsnc,sncm->bsnm", p.v, w1[:S])
  count = p.valid.astype(_F32)
  if causal:
    hidden, count = mixing.run_cumsum(contrib, p), mixing.run_cumsum(count, p)
  else:
    hidden, count = mixing.run_total(contrib, p), mixing.run_total(count, p)
  hidden = jax.nn.relu(mixing.take_query_rows(hidden, p) + b1)
  count = mixing.take_query_rows(count, p)
  if p.full_rows and not p.segmented:
    out = precise_einsum("btnm,tnmc->btnc", hidden, w2[:S]) + b2[:S]
  else:
    row_pos = jnp.take_along_axis(p.pos, p.rows, axis=1)
    out = precise_einsum("btnm,btnmc->btnc", hidden, w2[row_pos]) + b2[row_pos]
  return jnp.where(count[:, :, None, None] > 0, out, 0.0)


def _ffn_reference(p: MixerInputs, w1, b1, w2, b2, causal):
  """Per query: gather its run into a zero-padded [L, h] input, mask, flatten, apply the FFN."""
  L = w1.shape[0]
  S = p.v.shape[1]

  def one_row(row):
    run_start = jnp.take_along_axis(p.start, row[:, None], axis=1)          # [B, 1]
    idx = run_start + jnp.arange(L)[None]                                   # [B, L] slots
    slot = jnp.clip(idx, 0, S - 1)
    vis = ((idx < S) & (jnp.take_along_axis(p.start, slot, axis=1) == run_start)
           & jnp.take_along_axis(p.valid, slot, axis=1))
    if causal:
      vis &= idx <= row[:, None]
    x = jnp.where(vis[:, :, None, None], jnp.take_along_axis(p.v, slot[:, :, None, None], axis=1),
                  0.0)                                                      # [B, L, N, h]
    flat = jnp.moveaxis(x, 2, 1).reshape(x.shape[0], x.shape[2], -1)         # [B, N, L·h]
    w1_flat = jnp.moveaxis(w1, 1, 0).reshape(w1.shape[1], -1, w1.shape[3])  # [N, L·h, M]
    hidden = jax.nn.relu(precise_einsum("bnf,nfm->bnm", flat, w1_flat) + b1)
    row_pos = row - run_start[:, 0]
    out = precise_einsum("bnm,bnmc->bnc", hidden, w2[row_pos]) + b2[row_pos]
    return jnp.where(jnp.any(vis, axis=1)[:, None, None], out, 0.0)

  return jnp.moveaxis(lax.map(one_row, p.rows.T), 0, 1)


_IMPLEMENTATIONS = (("xla", _ffn_xla, ()), ("reference", _ffn_reference, ()))


def _example(*, N: int = 4, h: int = 6):
  """Arrays at N heads and value width h, maximum length EXAMPLE_MAX_LENGTH."""
  L, M = EXAMPLE_MAX_LENGTH, EXAMPLE_HIDDEN
  return example_arrays(80, {
      "ffn_in": ((L, N, h, M), 0.0, 0.15),
      "ffn_in_bias": ((N, M), 0.1, 0.1),
      "ffn_out": ((L, N, M, h), 0.0, 0.3),
      "ffn_out_bias": ((L, N, h), 0.0, 0.1),
  })


register(Mechanism(
    name="ffn_attention_replacement", fn=ffn_attention_replacement, family="alternative-mixer",
    seeds=(80,), paper="Rethinking Attention: Exploring Shallow Feed-Forward Neural Networks as an "
                       "Alternative to Attention Layers in Transformers", arxiv="2311.10642",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, packed=True,
    # The paper's FFN reads one stream (x). Trained end to end: the paper's distillation from a
    # trained attention layer is not implemented.
    reads=frozenset({"v"}),
    complexity="O(T·h·M) (weights O(L·h·M), L = maximum length)",
    implementations=("xla", "reference"),
    # The layer creates the value width h equal to the head dim H.
    params=(
        ParamSpec("ffn_in", lambda N, K, H: (DEFAULT_MAX_LENGTH, N, H, FFN_HIDDEN),
                  jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 2),
                                                       out_axis=3, batch_axis=1)),
        ParamSpec("ffn_in_bias", lambda N, K, H: (N, FFN_HIDDEN), jax.nn.initializers.zeros),
        ParamSpec("ffn_out", lambda N, K, H: (DEFAULT_MAX_LENGTH, N, FFN_HIDDEN, H),
                  jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=2,
                                                       out_axis=(0, 3), batch_axis=1)),
        ParamSpec("ffn_out_bias", lambda N, K, H: (DEFAULT_MAX_LENGTH, N, H),
                  jax.nn.initializers.zeros),
    ),
    example=_example))
