"""Causal pairwise mixer: each token combined with its predecessor and the running mean.

Paper: Hilsenbek, "Breaking the Attention Bottleneck", arXiv:2406.10906 (catalog #134).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core import checks
from attnjax.core import implementations
from attnjax.core import mixing
from attnjax.core.mixing import MixerInputs, precise_einsum
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["causal_pairwise_mixer"]

_F32 = jnp.float32
# Shapes in the signature (jaxtyping; letters of `attnjax.typing`).
HeadMatrix = Float[Array, "N h h"]
HeadBias = Float[Array, "N h"]


def causal_pairwise_mixer(q: Query, k: Key, v: Value, *,
                          pairwise_current: HeadMatrix, pairwise_previous: HeadMatrix,
                          pairwise_context: HeadMatrix, pairwise_bias: HeadBias,
                          use_context: bool = True,
                          causal: bool = True, segment_ids: Optional[SegmentIds] = None,
                          q_offset=0, kv_lengths: Optional[Lengths] = None,
                          scale: Optional[float] = None, implementation: Optional[str] = None,
                          initial_state: Optional[dict] = None, return_final_state: bool = False
                          ) -> Union[Output, tuple[Output, dict]]:
  """Causal pairwise mixer: a learned function of each token and its predecessor (+ running mean).

      y_t = GELU(v_t A + v_{t-1} B + m_t C + b),      m_t = (1/t) Σ_{j<=t} v_j   (tanh GELU)

  per head (v_{t-1} = 0 at a sequence's first token; the m_t C term only with `use_context`). The
  output at t depends on tokens t and t - 1 only, and on earlier tokens only through the mean.

  Paper: Hilsenbek, "Breaking the Attention Bottleneck", arXiv:2406.10906. The paper combines
  consecutive layer inputs x_t, x_{t-1} (and their running average): one stream. Here that stream
  is each head's values v (`reads={"v"}`: q and k are not read, and the layer creates no
  projection for them).

  Args:
    q: `[B, T, N, H]`, k: `[B, S, K, H]`: not read (shapes only). v: `[B, S, K, h]`.
    pairwise_current (A), pairwise_previous (B), pairwise_context (C): `[N, h, h]`;
      pairwise_bias (b): `[N, h]`.
    use_context: add the running-mean context term.
    causal: must be True.
    segment_ids, q_offset, kv_lengths: the common contract (a KV cache gives the same rows as the
      full forward; the first token of each packed run has no predecessor).
    scale: must be None (no scores). implementation: "xla" (shifts and a cumulative sum, O(T)) or
      "reference" (an explicit loop over query rows).
    initial_state, return_final_state: recurrent decoding (`Mechanism.recurrent`): q, k, v are the
      new tokens; the state `{"previous": [B,K,h], "sum": [B,K,h], "count": [B]}` (the last value,
      the running sum and count of values; None before the first token) replaces the cache.

  Returns:
    `[B, T, N, h]` in q's dtype; a row with no visible token is zero. With `return_final_state`,
    `(out, state)`.
  """
  op = "causal_pairwise_mixer"
  mixing.check_self_pattern(op, causal, allowed=(True,))
  mixing.reject_scale(op, scale)
  if return_final_state:
    return _pairwise_recurrent(op, q, k, v, initial_state, pairwise_current, pairwise_previous,
                               pairwise_context, pairwise_bias, use_context,
                               segment_ids=segment_ids, kv_lengths=kv_lengths)
  if initial_state is not None:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  p = mixing.prepare_mixer_inputs(op, q, k, v, segment_ids=segment_ids, q_offset=q_offset,
                                  kv_lengths=kv_lengths, scale=scale, decode=True)
  _, _, _, N, _, _, h = p.dims
  mats = [mixing.check_param(op, name, x, (N, h, h), "[N, h, h]") for name, x in (
      ("pairwise_current", pairwise_current), ("pairwise_previous", pairwise_previous),
      ("pairwise_context", pairwise_context))]
  bias = mixing.check_param(op, "pairwise_bias", pairwise_bias, (N, h), "[N, h]")
  out = implementations.dispatch(op, _IMPLEMENTATIONS, implementation, p, *mats, bias,
                                 use_context)
  return out.astype(q.dtype)


def _pairwise_out(cur, prev, mean, count, a, b, c, bias, use_context):
  pre = (precise_einsum("bnc,ncd->bnd", cur, a) + precise_einsum("bnc,ncd->bnd", prev, b)
         + bias)
  if use_context:
    pre = pre + precise_einsum("bnc,ncd->bnd", mean, c)
  return jnp.where(count[:, None, None] > 0, jax.nn.gelu(pre), 0.0)


def _pairwise_xla(p: MixerInputs, a, b, c, bias, use_context):
  prev = jnp.concatenate([jnp.zeros_like(p.v[:, :1]), p.v[:, :-1]], axis=1)
  prev = jnp.where((p.pos >= 1)[:, :, None, None], prev, 0.0)
  count = mixing.run_cumsum(p.valid.astype(_F32), p)
  mean = mixing.run_cumsum(p.v, p) / jnp.maximum(count, 1.0)[:, :, None, None]
  cur, prev, mean, count = (mixing.take_query_rows(x, p) for x in (p.v, prev, mean, count))
  fold = lambda x: x.reshape((-1,) + x.shape[2:])
  out = _pairwise_out(fold(cur), fold(prev), fold(mean), fold(count), a, b, c, bias, use_context)
  return out.reshape(cur.shape)


def _pairwise_reference(p: MixerInputs, a, b, c, bias, use_context):
  """Explicit loop over query rows: token, predecessor and visible mean read from the cache."""

  def one_row(row):
    vis = mixing.visible_prefix(p, row)
    count = jnp.sum(vis, axis=1).astype(_F32)
    mean = jnp.sum(jnp.where(vis[:, :, None, None], p.v, 0.0), axis=1) / jnp.maximum(
        count, 1.0)[:, None, None]
    cur = jnp.take_along_axis(p.v, row[:, None, None, None], axis=1)[:, 0]
    has_prev = jnp.take_along_axis(p.pos, row[:, None], axis=1)[:, 0] >= 1
    prev = jnp.take_along_axis(p.v, jnp.maximum(row - 1, 0)[:, None, None, None], axis=1)[:, 0]
    prev = jnp.where(has_prev[:, None, None], prev, 0.0)
    return _pairwise_out(cur, prev, mean, count, a, b, c, bias, use_context)

  return jnp.moveaxis(lax.map(one_row, p.rows.T), 0, 1)


_IMPLEMENTATIONS = (("xla", _pairwise_xla, ()), ("reference", _pairwise_reference, ()))


def _pairwise_recurrent(op, q, k, v, state, a, b, c, bias, use_context, *, segment_ids,
                        kv_lengths):
  """The mixer over T new tokens from the carried (previous value, running sum, count)."""
  B, T, S, N, K, _, h = checks.check_qkv(op, q, k, v)
  if T != S or segment_ids is not None or kv_lengths is not None:
    raise ValueError(f"{op}: recurrent decoding takes the new tokens only (T == S, got T={T}, "
                     f"S={S}) and no `segment_ids` or `kv_lengths`")
  mats = [mixing.check_param(op, name, x, (N, h, h), "[N, h, h]") for name, x in (
      ("pairwise_current", a), ("pairwise_previous", b), ("pairwise_context", c))]
  bias = mixing.check_param(op, "pairwise_bias", bias, (N, h), "[N, h]")
  if state is None:
    state = {"previous": jnp.zeros((B, K, h), _F32), "sum": jnp.zeros((B, K, h), _F32),
             "count": jnp.zeros((B,), _F32)}
  for name, want in (("previous", (B, K, h)), ("sum", (B, K, h)), ("count", (B,))):
    checks.check_shape(op, f"initial_state[{name!r}]", state[name], want,
                       "[B, K, h]" if name != "count" else "[B]")
  vf = v.astype(_F32)
  prev = jnp.concatenate([state["previous"][:, None], vf[:, :-1]], axis=1)     # v_{t-1}
  sums = state["sum"][:, None] + jnp.cumsum(vf, axis=1)
  count = state["count"][:, None] + jnp.arange(1, T + 1, dtype=_F32)           # [B, T]
  heads = lambda x: jnp.repeat(x, N // K, axis=2).reshape((B * T, N, h))
  out = _pairwise_out(heads(vf), heads(prev), heads(sums / count[..., None, None]),
                      count.reshape(-1), *mats, bias, use_context)
  new_state = {"previous": vf[:, -1], "sum": sums[:, -1], "count": count[:, -1]}
  return out.reshape(B, T, N, h).astype(q.dtype), new_state


def _example(*, N: int = 4, h: int = 6):
  """Arrays at N heads and value width h."""
  return example_arrays(134, {
      "pairwise_current": ((N, h, h), 0.0, 0.4),
      "pairwise_previous": ((N, h, h), 0.0, 0.4),
      "pairwise_context": ((N, h, h), 0.0, 0.4),
      "pairwise_bias": ((N, h), 0.0, 0.1),
  })


_square = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2,
                                               batch_axis=0)
register(Mechanism(
    name="causal_pairwise_mixer", fn=causal_pairwise_mixer, family="alternative-mixer",
    seeds=(134,), paper="Breaking the Attention Bottleneck", arxiv="2406.10906",
    patterns=frozenset({"causal_self"}), gqa=True, decode=True, recurrent=True, packed=True,
    reads=frozenset({"v"}),  # the paper mixes one stream: each token and its predecessor
    complexity="O(T)",
    implementations=("xla", "reference"),
    # The layer creates the value width h equal to the head dim H.
    params=(
        ParamSpec("pairwise_current", lambda N, K, H: (N, H, H), _square),
        ParamSpec("pairwise_previous", lambda N, K, H: (N, H, H), _square),
        ParamSpec("pairwise_context", lambda N, K, H: (N, H, H), _square),
        ParamSpec("pairwise_bias", lambda N, K, H: (N, H), jax.nn.initializers.zeros),
    ),
    example=_example,
    # Decoding needs the previous token's value and the running sum and count of the values.
    state_size=lambda T, N, K, H, h, kw: 2 * K * h + 1))
