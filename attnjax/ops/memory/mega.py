"""Mega (#168): a damped multi-dimensional EMA feeds a gated single-head attention.

Paper: Ma et al., "Mega: Moving Average Equipped Gated Attention", arXiv:2209.10655. The EMA is
`attnjax.core.ema`; the softmax runs on `attnjax.core.flex.flex_attention` (chunks folded into the
batch by `attnjax.core.local_blocks` in a full forward). Causal chunked Mega also decodes from a
fixed-size state, the EMA's and the current chunk's (`attnjax.core.memory_state`).

Head-space adaptation (the contract gives only q, k, v): what the paper computes from the layer
input is computed from the head vectors given (per key/value head for the key and value streams,
per query head for the query stream). A learned array over the value width h has h = H in the layer
(its head dim, the registry's ParamSpec); the operator called directly takes it at the width of `v`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import implementations
from attnjax.core import masks
from attnjax.core import memory_state
from attnjax.core import param_tables
from attnjax.core.ema import ema_coefficients, multidim_ema
from attnjax.core.local_blocks import block_local_attention
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

MEGA_NDIM = 16   # the paper's EMA expansion dimension


def _to_query_heads(x: jax.Array, N: int) -> jax.Array:
  """`[B, T, K, d]` → `[B, T, N, d]`: query head n reads key/value head n // (N / K), as flex
  does."""
  return jnp.repeat(x, N // x.shape[2], axis=2)


def _segment_chunk_ids(segment_ids, S: int, chunk_size: int):
  """Chunk index of each key `[B, S]`, counted from the start of its packed document."""
  start, _ = contract.document_bounds(segment_ids, jnp.shape(segment_ids)[0], S)
  return (jnp.arange(S, dtype=jnp.int32)[None] - start) // chunk_size


def _attend_masked(queries, keys, values, *, causal, chunk_size, segment_ids, q_offset,
                   kv_lengths, full, implementation):
  """The gated attention's softmax as masked flex attention (chunks as a mask), any call."""
  del full
  B, T, S = queries.shape[0], queries.shape[1], keys.shape[1]
  mods = [contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                 segment_ids=segment_ids, kv_lengths=kv_lengths,
                                 op="mega_attention")]
  if chunk_size is not None:
    if segment_ids is None:
      mods.append(masks.chunked(chunk_size, offset=contract.query_positions(B, T, q_offset)[:, 0]))
    else:
      cid = _segment_chunk_ids(segment_ids, S, chunk_size)
      mods.append(lambda b, n, qi, ki: cid[b, qi] == cid[b, ki])
  return flex.flex_attention(queries, keys, values, mask_mod=masks.combine_masks(*mods), scale=1.0,
                             implementation=implementation)


def _attend_xla(queries, keys, values, **call):
  """Chunks as a batch of `[c, c]` problems in a full forward without documents; otherwise the
  masked flex attention's "xla" form."""
  if call["chunk_size"] is not None and call["segment_ids"] is None and call["full"]:
    return block_local_attention(queries, keys, values, block=call["chunk_size"],
                                 causal=call["causal"], kv_lengths=call["kv_lengths"], scale=1.0,
                                 op="mega_attention")
  return _attend_masked(queries, keys, values, implementation="xla", **call)


def _attend_reference(queries, keys, values, **call):
  """Dense masked attention."""
  return _attend_masked(queries, keys, values, implementation="reference", **call)


_ATTEND_IMPLEMENTATIONS = (("xla", _attend_xla, ()), ("reference", _attend_reference, ()))


def _rotary(x, pos: jax.Array) -> jax.Array:
  """Mega's rotary map of a learned vector at absolute positions (its rotary relative-position
  bias): `x: [G, H]` (H even), `pos: [B, L]` → `[B, L, G, H]`, channel pairs (c, c + H/2)
  rotated by the angle `pos · 10000^(-c / (H/2))`."""
  half = x.shape[-1] // 2
  freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / half))
  angle = pos.astype(jnp.float32)[..., None, None] * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _queries(z_q, pos, p, scale):
  """`[scale · (κ_q ⊙ Z_p + μ_q), rot_p(a)]`: `[B, T, N, 2H]` from Z at the query heads."""
  return jnp.concatenate([scale * (p["query_kappa"] * z_q + p["query_mu"]),
                          _rotary(p["rel_alpha"], pos)], -1)


def _keys(z, key_pos, p):
  """`[κ_k ⊙ Z_j, rot_j(b)]`: `[B, S, K, 2H]`."""
  return jnp.concatenate([p["key_kappa"] * z, _rotary(p["rel_beta"], key_pos)], -1)


def _gated_output(x_q, o, residual, p):
  """The reset / update gates and the candidate on the attention output `o` (`[B, T, N, h]`),
  all reading the EMA output X' of the query's own token `x_q` (`[B, T, N, H]`)."""
  dense = lambda name: (jnp.einsum("btnh,nhd->btnd", x_q, p[name + "_kernel"])
                        + p[name + "_bias"])
  reset = jax.nn.silu(dense("reset"))
  update = jax.nn.sigmoid(dense("update"))
  candidate = jax.nn.silu(dense("candidate")
                          + jnp.einsum("btnd,nde->btne", reset * o, p["candidate_attn_kernel"]))
  return update * candidate + (1.0 - update) * residual


def _ema_from_state(x, h0, p):
  """The forward (causal) EMA continued from the carried `h0 [B, K, H, ndim]` over the new tokens
  `x [B, T, K, H]` (a scan, Mega eq. (2)): `(y [B, T, K, H], h after the last token)`."""
  ab, phi, eta = ema_coefficients(*(p[f"ema_{name}"][0] for name in
                                    ("alpha", "delta", "beta", "eta")))

  def step(state, x_t):
    state = phi * state + ab * x_t[..., None]
    return state, jnp.sum(eta * state, axis=-1)

  final, ys = jax.lax.scan(step, h0, jnp.moveaxis(x, 1, 0))
  return jnp.moveaxis(ys, 0, 1), final


def _mega_recurrent(op, q, k, v, p, state, *, chunk_size, q_offset, scale, implementation):
  """Causal chunked Mega over the T new tokens from the carried state (see `mega_attention`)."""
  B, T, N = q.shape[:3]
  K, H, h, ndim = k.shape[2], k.shape[3], v.shape[3], p["ema_alpha"].shape[-1]
  R = chunk_size - 1   # a query's chunk holds at most c - 1 earlier positions
  state = memory_state.checked_state(
      op, state, {"ema": (B, K, H, ndim), "keys": (B, R, K, H), "values": (B, R, K, h)},
      {"ema": "[B, K, H, ndim]", "keys": "[B, c - 1, K, H]", "values": "[B, c - 1, K, h]"})
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  ema, ema_state = _ema_from_state(kf, state["ema"], p)
  x_ema = jax.nn.silu(ema + p["ema_omega"] * kf)                                   # X'
  z = jax.nn.silu(jnp.einsum("bskh,khd->bskd", x_ema, p["z_kernel"]) + p["z_bias"])
  n = memory_state.tokens_before(B, q_offset)
  zs, kept_keys = memory_state.shift_in(state["keys"], z)
  values, kept_values = memory_state.shift_in(state["values"], jax.nn.silu(vf))
  queries = _queries(_to_query_heads(z, N), contract.query_positions(B, T, n), p, scale)
  o = flex.flex_attention(queries, _keys(zs, memory_state.slot_positions(n, R, T), p), values,
                          mask_mod=memory_state.recent_mask(n, R, block=chunk_size), scale=1.0,
                          implementation=implementation)
  out = _gated_output(_to_query_heads(x_ema, N), o, _to_query_heads(vf, N), p)
  new_state = {"ema": ema_state, "keys": kept_keys, "values": kept_values}
  return out.astype(q.dtype), new_state


def mega_attention(q: Query, k: Key, v: Value, *, ema_alpha, ema_delta, ema_beta, ema_eta,
                   ema_omega, z_kernel, z_bias, query_kappa, query_mu, key_kappa, rel_alpha,
                   rel_beta, reset_kernel, reset_bias, update_kernel, update_bias,
                   candidate_kernel, candidate_attn_kernel, candidate_bias,
                   chunk_size: Optional[int] = None, causal: bool = False,
                   segment_ids: Optional[SegmentIds] = None, q_offset=0,
                   kv_lengths: Optional[Lengths] = None, scale=None,
                   implementation: Optional[str] = None, initial_state: Optional[dict] = None,
                   return_final_state: bool = False) -> Union[Output, tuple[Output, dict]]:
  """Mega: a damped multi-dim EMA of the input feeds one shared Q/K stream and the gates of a
  single-head softmax attention with a GRU-like output, optionally chunked.

  Paper: Ma et al., "Mega: Moving Average Equipped Gated Attention", arXiv:2209.10655, section 3
  (the multi-dimensional damped EMA and the gated attention), and the authors' code
  (facebookresearch/mega, `MovingAverageGatedAttention`, `MultiHeadEMA`).
  The layer input X reaches the operator as the key stream k (X W_k: the EMA and all that derives
  from it) and the value stream v (X W_v: the values and the residual); `q` is NOT read (Mega's
  queries come from the shared Z; the registry declares `reads={"k", "v"}`, so the layer makes no
  query projection). Per key/value head g and query head n (g = n // (N/K)), query position
  p = q_offset + t, key position j:

      X'  = SiLU(EMA(k) + ω ⊙ k)                   [H]  per-channel damped EMA (bidirectional
                                                         unless causal); ω residual and SiLU as
                                                         in the authors' code
      Z   = SiLU(X' W_z + b_z)                      [H]  shared representation
      Q_p = κ_q ⊙ Z_p + μ_q,    K_j = κ_k ⊙ Z_j,    V_j = SiLU(v_j)
      O_p = Σ_j softmax_j(scale · Q_p·K_j + rot_p(a)·rot_j(b), masked) V_j        [h]
      γ_p = SiLU(X'_p W_γ + b_γ)                    [h]  reset gate
      φ_p = σ(X'_p W_φ + b_φ)                       [h]  update gate
      Ĥ_p = SiLU(X'_p W_h + (γ_p ⊙ O_p) U_h + b_h)  [h]
      Y_p = φ_p ⊙ Ĥ_p + (1 - φ_p) ⊙ v_p

  rot_p(a)·rot_j(b) is the rotary relative-position bias of the authors' code (a function of p - j
  only; `_rotary`), computed as an extra channel block of the dot product ([scale·Q, rot(a)] ·
  [K, rot(b)]) so every attention path (dense, flex, chunk blocks) carries it. The paper's key
  offset μ_k (K_j = κ_k ⊙ Z_j + μ_k) is left out: it adds Q_p·μ_k to every logit of row p, which
  the softmax cancels, so it could never learn anything (it matters only for Mega's laplace /
  relu² attention, not offered).

  Head-space adaptation: Mega is one head with widths z (Q/K), v (values) and d (model); here each
  query head is such a head with z = H (X' and Z are read per key/value head from k) and v = d = h
  (Y_p has the value width; the layer's output projection follows, where Mega has none). The code's
  other bias, a learned scalar per distance, is sized by the maximum length and cannot be a
  ParamSpec; its laplace / relu² attention variants are not offered (softmax only). Arrays over
  the value width h are sized with h = H in the layer (its head dim); called directly, they take
  the value width of `v`. Apart from μ_k, every term of the paper's gated attention is computed.

  Args:
    q: `[B, T, N, H]` (shape only: not read); k: `[B, S, K, H]`; v: `[B, S, K, h]`; H even.
    ema_alpha, ema_delta: `[2, K, H, ndim]` logits of α, δ (0: forward EMA, 1: backward EMA).
    ema_beta, ema_eta: `[2, K, H, ndim]` expansion and readout vectors; ema_omega: `[K, H]`.
    z_kernel: `[K, H, H]`, z_bias: `[K, H]` (W_z, b_z).
    query_kappa, query_mu: `[N, H]` per-channel scale and offset; key_kappa: `[K, H]` scale.
    rel_alpha: `[N, H]`, rel_beta: `[K, H]` (a, b of the rotary relative-position bias).
    reset_kernel, update_kernel, candidate_kernel: `[N, H, h]` (W_γ, W_φ, W_h);
    candidate_attn_kernel: `[N, h, h]` (U_h); reset_bias, update_bias, candidate_bias: `[N, h]`.
    chunk_size: attend only within chunks of this many positions (counted from each packed
      document's start): cost O(T·c). None: full attention.
    causal, segment_ids, q_offset, kv_lengths, scale: the common contract (scale defaults to H^-½).
    implementation: "reference" (EMA scan, dense attention) or "xla" (FFT EMA, chunks as a batch of
      `[c, c]` problems in a full forward, otherwise chunked flex attention).
    initial_state, return_final_state: recurrent decoding, causal and chunked only: q, k, v are
      the T new tokens at positions n, ..., n + T - 1 (n = `q_offset`), any number of chunk
      boundaries among them. The state is the forward EMA's `h` and the current chunk:
      `{"ema": [B, K, H, ndim], "keys": [B, c - 1, K, H] (Z), "values": [B, c - 1, K, h]
      (SiLU(v))}` float32, the last c - 1 positions oldest first (`attnjax.core.memory_state`;
      zeros or None: no tokens yet). Returns the full forward's rows and the state after n + T.

  Returns:
    `[B, T, N, h]` in q's dtype; zeros at query positions past `kv_lengths`. With
    `return_final_state`, `(out, state)`.
  """
  op = "mega_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  impl = checks.check_implementation(op, implementation)
  p = dict(ema_alpha=ema_alpha, ema_delta=ema_delta, ema_beta=ema_beta, ema_eta=ema_eta,
           ema_omega=ema_omega, z_kernel=z_kernel, z_bias=z_bias, query_kappa=query_kappa,
           query_mu=query_mu, key_kappa=key_kappa, rel_alpha=rel_alpha,
           rel_beta=rel_beta, reset_kernel=reset_kernel, reset_bias=reset_bias,
           update_kernel=update_kernel, update_bias=update_bias, candidate_kernel=candidate_kernel,
           candidate_attn_kernel=candidate_attn_kernel, candidate_bias=candidate_bias)
  param_tables.check_table(op, MEGA_TABLE, p, N=N, K=K, H=H, h=h, ndim=jnp.shape(ema_alpha)[-1])
  if H % 2:
    raise ValueError(f"{op}: the rotary relative-position bias pairs the channels of the key head "
                     f"dim H, which must be even; got k {k.shape}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"{op}: `chunk_size` must be >= 1 or None, got {chunk_size}")
  if initial_state is not None and not return_final_state:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  scale = H ** -0.5 if scale is None else scale
  p = {name: jnp.asarray(x, jnp.float32) for name, x in p.items()}
  if return_final_state:
    memory_state.check_recurrent_call(op, causal=causal, segment_ids=segment_ids,
                                       kv_lengths=kv_lengths, T=T, S=S)
    if chunk_size is None:
      raise ValueError(f"{op}: recurrent decoding carries the current chunk: set `chunk_size`, or "
                       "decode the unchunked attention over a KV cache")
    return _mega_recurrent(op, q, k, v, p, initial_state, chunk_size=chunk_size,
                           q_offset=q_offset, scale=scale, implementation=impl)
  full = contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                       segment_ids=segment_ids)

  # Cache slots past kv_lengths hold garbage: zero them so the (bidirectional) EMA cannot read them.
  kf, vf = contract.zero_padded(k, kv_lengths), contract.zero_padded(v, kv_lengths)
  ema = multidim_ema(kf, p["ema_alpha"], p["ema_delta"], p["ema_beta"], p["ema_eta"],
                     causal=causal, segment_ids=segment_ids, implementation=impl)
  x_ema = jax.nn.silu(ema + p["ema_omega"] * kf)                                   # X'
  z = jax.nn.silu(jnp.einsum("bskh,khd->bskd", x_ema, p["z_kernel"]) + p["z_bias"])
  pos = contract.query_positions(B, T, q_offset)
  key_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (B, S))
  queries = _queries(_to_query_heads(contract.gather_positions(z, pos), N), pos, p, scale)
  o = implementations.dispatch(op, _ATTEND_IMPLEMENTATIONS, impl, queries, _keys(z, key_pos, p),
                               jax.nn.silu(vf), causal=causal, chunk_size=chunk_size,
                               segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                               full=full)
  out = _gated_output(_to_query_heads(contract.gather_positions(x_ema, pos), N), o,
                      _to_query_heads(contract.gather_positions(vf, pos), N), p)
  if kv_lengths is not None:
    # A padding query sees no key (its own slot is hidden): zeros, as every mechanism gives there.
    out = jnp.where((pos < jnp.asarray(kv_lengths, jnp.int32)[:, None])[..., None, None], out, 0.0)
  return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Registration


def _alternating_beta(key, shape, dtype=jnp.float32):
  # Mega's code starts β at ±1 alternating along the expansion dim (plus small noise), so the ndim
  # EMA components do not start identical.
  sign = jnp.where(jnp.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
  return (sign + 0.02 * jax.random.normal(key, shape)).astype(dtype)


_init = jax.nn.initializers
_fan_in = param_tables.fan_in_normal
# (name, shape(N, K, H, h, ndim), shape in letters, init): see `attnjax.core.param_tables`.
MEGA_TABLE = (
    ("ema_alpha", lambda N, K, H, h, ndim=MEGA_NDIM: (2, K, H, ndim), "[2, K, H, ndim]",
     _init.normal(0.2)),
    ("ema_delta", lambda N, K, H, h, ndim=MEGA_NDIM: (2, K, H, ndim), "[2, K, H, ndim]",
     _init.normal(0.2)),
    ("ema_beta", lambda N, K, H, h, ndim=MEGA_NDIM: (2, K, H, ndim), "[2, K, H, ndim]",
     _alternating_beta),
    ("ema_eta", lambda N, K, H, h, ndim=MEGA_NDIM: (2, K, H, ndim), "[2, K, H, ndim]",
     _init.normal(MEGA_NDIM ** -0.5)),
    ("ema_omega", lambda N, K, H, h, **_: (K, H), "[K, H]", _init.normal(1.0)),
    ("z_kernel", lambda N, K, H, h, **_: (K, H, H), "[K, H, H]", _fan_in),
    ("z_bias", lambda N, K, H, h, **_: (K, H), "[K, H]", _init.zeros),
    ("query_kappa", lambda N, K, H, h, **_: (N, H), "[N, H]", _init.ones),
    ("query_mu", lambda N, K, H, h, **_: (N, H), "[N, H]", _init.zeros),
    ("key_kappa", lambda N, K, H, h, **_: (K, H), "[K, H]", _init.ones),
    ("rel_alpha", lambda N, K, H, h, **_: (N, H), "[N, H]", _init.normal(0.02)),
    ("rel_beta", lambda N, K, H, h, **_: (K, H), "[K, H]", _init.normal(0.02)),
    ("reset_kernel", lambda N, K, H, h, **_: (N, H, h), "[N, H, h]", _fan_in),
    ("reset_bias", lambda N, K, H, h, **_: (N, h), "[N, h]", _init.zeros),
    ("update_kernel", lambda N, K, H, h, **_: (N, H, h), "[N, H, h]", _fan_in),
    ("update_bias", lambda N, K, H, h, **_: (N, h), "[N, h]", _init.zeros),
    ("candidate_kernel", lambda N, K, H, h, **_: (N, H, h), "[N, H, h]", _fan_in),
    ("candidate_attn_kernel", lambda N, K, H, h, **_: (N, h, h), "[N, h, h]", _fan_in),
    ("candidate_bias", lambda N, K, H, h, **_: (N, h), "[N, h]", _init.zeros),
)


def mega_param_specs(h: Optional[int] = None) -> tuple[ParamSpec, ...]:
  """Mega's learned arrays as ParamSpecs, for value width `h` (None: h = H, the Flax layer's)."""
  return param_tables.param_specs(MEGA_TABLE, h=h)


def _example(*, N: int, K: int, H: int, h: int) -> dict:
  return dict(chunk_size=8, **example_params(mega_param_specs(h=h), N=N, K=K, H=H, perturb=0.3))


def _state_size(T, N, K, H, h, kw):
  # The forward EMA's state per channel, plus the c - 1 positions of the current chunk (chunked:
  # the recurrent state) or all T keys and values (unchunked: decoding reads the whole cache).
  ndim = jnp.shape(kw["ema_alpha"])[-1] if "ema_alpha" in kw else MEGA_NDIM
  chunk = kw.get("chunk_size")
  return K * H * ndim + (T if chunk is None else chunk - 1) * K * (H + h)


register(Mechanism(
    name="mega_attention", fn=mega_attention, family="recurrent-memory", seeds=(168,),
    paper="Mega: Moving Average Equipped Gated Attention", arxiv="2209.10655",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, recurrent=True,
    packed=True,
    # Q and K both come from the EMA of the input (the key stream); q is never read.
    reads=frozenset({"k", "v"}),
    complexity="O(T·S); O(T·c) chunked", implementations=("xla", "reference"),
    params=mega_param_specs(), example=_example, state_size=_state_size,
    # Unchunked Mega attends to every earlier token: the layer keeps a KV cache then.
    recurrent_when=lambda kw: kw.get("chunk_size") is not None))

__all__ = ["mega_attention", "mega_param_specs", "MEGA_NDIM", "MEGA_TABLE"]
