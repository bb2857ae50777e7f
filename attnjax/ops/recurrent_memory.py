"""Recurrent-memory attention: Mega (#168), the SHA-RNN attention block (#56) and the Recurrent
Attention Network (#65), each in the head space of the operator contract.

All three carry information along the sequence outside the softmax: Mega through a damped exponential
moving average of the inputs, the SHA-RNN through a memory of past states read by a gated single-head
attention, and RAN through a Global Perception Cell (GPC) vector passed from window to window. The
softmax parts reuse `attnjax.core.flex.flex_attention` / `attnjax.ops.dot_product_attention`.

Head-space adaptation (the contract gives only q, k, v): what a paper computes from the layer input is
computed from the head vectors given (per key/value head for the key and value streams, per query head
for the query stream), and learned arrays are sized by (N, K, H) only, so a paper's per-channel vector
over the value dimension h becomes one scalar per head (said where it happens).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.merge import merge_attention_states
from attnjax.ops.dot_product import contract_mask, dot_product_attention
from attnjax.registry import Mechanism, ParamSpec, example_params, register

# ----------------------------------------------------------------------------------------------------
# Shared helpers


def _positions(B: int, T: int, q_offset) -> jax.Array:
  """Absolute query positions `q_offset + t`, `[B, T]` int32 (`q_offset`: int or `[B]`)."""
  off = jnp.asarray(q_offset, jnp.int32)
  off = off[:, None] if off.ndim == 1 else off
  return jnp.broadcast_to(off + jnp.arange(T, dtype=jnp.int32)[None], (B, T))


def _key_valid(B: int, S: int, kv_lengths) -> jax.Array:
  """`[B, S]` True at keys below `kv_lengths` (all True without lengths)."""
  idx = jnp.arange(S, dtype=jnp.int32)[None]
  if kv_lengths is None:
    return jnp.ones((B, S), bool)
  return idx < jnp.asarray(kv_lengths, jnp.int32)[:, None]


def _at_positions(x: jax.Array, pos: jax.Array) -> jax.Array:
  """`x[b, pos[b, t]]` for `x: [B, S, ...]`, `pos: [B, T]` (clipped into range) → `[B, T, ...]`."""
  pos = jnp.clip(pos, 0, x.shape[1] - 1)
  return jax.vmap(lambda xb, pb: xb[pb])(x, pos)


def _to_query_heads(x: jax.Array, N: int) -> jax.Array:
  """`[B, T, K, d]` → `[B, T, N, d]`: query head n reads key/value head n // (N / K), as flex does."""
  return jnp.repeat(x, N // x.shape[2], axis=2)


def _check_params(op: str, shapes: dict, params: dict):
  for name, (expected, letters) in shapes.items():
    checks.check_shape(op, name, params[name], expected, letters)


def _layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _check_self(op: str, T: int, S: int, q_offset, kv_lengths):
  """Mechanisms whose queries are read from the key stream need T == S or a cache (q_offset or
  kv_lengths given)."""
  if T != S and checks.is_static_zero(q_offset) and kv_lengths is None:
    raise ValueError(f"{op}: self-attention only (T == S, or T < S over a KV cache with `q_offset` "
                     f"and `kv_lengths`); got T={T}, S={S}")


# ----------------------------------------------------------------------------------------------------
# Mega: multi-dimensional damped EMA + gated single-head attention


def ema_coefficients(alpha, delta, beta, eta):
  """(input weight `α·β`, decay `φ = 1 - α·δ`, readout `η`) from the raw EMA parameters.

  `alpha`, `delta` are logits (α = σ(alpha), δ = σ(delta) keep 0 < φ < 1, a damped, stable EMA);
  every array is `[..., ndim]` (e.g. `[K, H, ndim]`), float32.
  """
  a = jax.nn.sigmoid(jnp.asarray(alpha, jnp.float32))
  d = jax.nn.sigmoid(jnp.asarray(delta, jnp.float32))
  return a * jnp.asarray(beta, jnp.float32), 1.0 - a * d, jnp.asarray(eta, jnp.float32)


def ema_recurrence(x, alpha, delta, beta, eta, *, reverse: bool = False, starts=None):
  """Multi-dimensional damped EMA as a recurrence (`lax.scan`), Mega eq. (2)-(3):

      h_t = α ⊙ β x_t + (1 - α ⊙ δ) ⊙ h_{t-1}  ∈ R^ndim (per channel),   y_t = η · h_t

  Args:
    x: `[B, T, K, H]`; alpha, delta, beta, eta: `[K, H, ndim]`.
    reverse: run from the end (the backward half of the bidirectional EMA).
    starts: `[B, T]` bool, True where the state restarts from zero (a new packed document; for
      `reverse`, the last position of a document).

  Returns:
    `[B, T, K, H]` float32.
  """
  ab, phi, eta = ema_coefficients(alpha, delta, beta, eta)
  xs = jnp.moveaxis(jnp.asarray(x, jnp.float32), 1, 0)
  st = (jnp.zeros(xs.shape[:2], bool) if starts is None else jnp.moveaxis(starts, 1, 0))

  def step(state, inp):
    x_t, start_t = inp
    state = jnp.where(start_t[:, None, None, None], 0.0, state)
    state = phi * state + ab * x_t[..., None]
    return state, jnp.sum(eta * state, axis=-1)

  init = jnp.zeros(xs.shape[1:] + (phi.shape[-1],), jnp.float32)
  _, ys = jax.lax.scan(step, init, (xs, st), reverse=reverse)
  return jnp.moveaxis(ys, 0, 1)


def ema_kernel(alpha, delta, beta, eta, length: int):
  """The EMA's convolution kernel `K_l = Σ_j η_j α_j β_j φ_j^l`, `l = 0..length-1`: `[length, K, H]`."""
  ab, phi, eta = ema_coefficients(alpha, delta, beta, eta)
  lags = jnp.arange(length, dtype=jnp.float32).reshape((length,) + (1,) * phi.ndim)
  return jnp.sum(eta * ab * jnp.exp(lags * jnp.log(phi)), axis=-1)


def ema_convolution(x, alpha, delta, beta, eta, *, reverse: bool = False):
  """The same EMA as a causal convolution `y_t = Σ_{l<=t} K_l x_{t-l}`, evaluated with an FFT of
  length 2T (O(T log T)); `reverse` convolves from the end. Shapes as `ema_recurrence`."""
  x = jnp.asarray(x, jnp.float32)
  T = x.shape[1]
  if reverse:
    x = jnp.flip(x, axis=1)
  kern = ema_kernel(alpha, delta, beta, eta, T)
  y = jnp.fft.irfft(jnp.fft.rfft(x, n=2 * T, axis=1) * jnp.fft.rfft(kern, n=2 * T, axis=0)[None],
                    n=2 * T, axis=1)[:, :T]
  return jnp.flip(y, axis=1) if reverse else y


def multidim_ema(x, alpha, delta, beta, eta, *, causal: bool, segment_ids=None,
                 implementation: str = "xla"):
  """Mega's EMA over `x: [B, T, K, H]` with parameters `[2, K, H, ndim]` (index 0: forward, 1:
  backward). Causal: the forward EMA only; otherwise the paper's bidirectional EMA, the sum of a
  forward and a backward EMA with their own parameters. `segment_ids` `[B, T]` restart it at document
  boundaries. `implementation`: "reference" scans; "xla" uses the FFT convolution (the scan with
  segments, where a convolution would leak across documents)."""
  B, T = x.shape[:2]
  scan = implementation == "reference" or segment_ids is not None
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    change = seg[:, 1:] != seg[:, :-1]
    first = jnp.concatenate([jnp.ones((B, 1), bool), change], axis=1)
    last = jnp.concatenate([change, jnp.ones((B, 1), bool)], axis=1)
  else:
    first = last = None
  directions = (0,) if causal else (0, 1)
  out = 0.0
  for d in directions:
    p = (alpha[d], delta[d], beta[d], eta[d])
    if scan:
      out = out + ema_recurrence(x, *p, reverse=d == 1, starts=first if d == 0 else last)
    else:
      out = out + ema_convolution(x, *p, reverse=d == 1)
  return out


def _segment_chunk_ids(segment_ids, S: int, chunk_size: int):
  """Chunk index of each key `[B, S]`, counted from the start of its packed document."""
  seg = jnp.asarray(segment_ids)
  idx = jnp.arange(S, dtype=jnp.int32)[None]
  change = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
  return (idx - start) // chunk_size


def _chunked_blocks(q, k, v, *, causal, kv_lengths, chunk_size, scale):
  """Attention within chunks as a batch of `[c, c]` problems: cost O(T·c), no `[T, T]` intermediate.
  Needs T == S with queries at positions 0..T-1 (a full forward)."""
  B, T, N, H = q.shape
  c = chunk_size
  nc = -(-T // c)
  pad = nc * c - T
  fold = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape((B * nc, c) + x.shape[2:])
  lengths = jnp.full((B,), T, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  starts = jnp.arange(nc, dtype=jnp.int32) * c
  chunk_lengths = jnp.clip(lengths[:, None] - starts[None], 0, c).reshape(B * nc)
  out = dot_product_attention(fold(q), fold(k), fold(v), causal=causal, kv_lengths=chunk_lengths,
                              scale=scale, implementation="xla")
  return out.reshape(B, nc * c, N, -1)[:, :T]


_MEGA_PARAMS = ("ema_alpha", "ema_delta", "ema_beta", "ema_eta", "query_kappa", "query_mu",
                "key_kappa", "key_mu", "reset_gate_weight", "reset_gate_bias", "update_gate_weight",
                "update_gate_bias")


def mega_attention(q, k, v, *, ema_alpha, ema_delta, ema_beta, ema_eta, query_kappa, query_mu,
                   key_kappa, key_mu, reset_gate_weight, reset_gate_bias, update_gate_weight,
                   update_gate_bias, chunk_size: Optional[int] = None, causal: bool = False,
                   segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                   implementation: Optional[str] = None):
  """Mega: damped-EMA-equipped, single-head-style gated softmax attention, optionally chunked.

  Paper: Ma et al., "Mega: Moving Average Equipped Gated Attention", arXiv:2209.10655, eqs. (2)-(3)
  and (6)-(14). Per key/value head g (query head n reads g = n // (N/K)), at absolute positions:

      x'  = EMA(k)                        multi-dim damped EMA over the key stream, per channel
      Z   = SiLU(x')                      the shared representation
      K_j = κ_k ⊙ Z_j + μ_k               Q_t = κ_q ⊙ Z_p + μ_q     (p = q_offset + t)
      O_t = softmax(scale · Q_t K_jᵀ, masked) SiLU(v_j)
      γ_t = SiLU(w_γ · x'_p + b_γ)        reset gate       φ_t = σ(w_φ · x'_p + b_φ)  update gate
      Y_t = φ_t · SiLU(γ_t · O_t) + (1 - φ_t) · v_p

  Adaptation to the contract: Mega's single input X is represented by the key stream (for the EMA,
  Z, Q and K: Q and K share Z, so the query of the token at position p is read from the key stream
  at p, which makes this self-attention only) and by the value stream (V = SiLU(v), and v_p is the
  residual X of the update gate). The gates are projected from the token's EMA output x'_p, as in
  Mega; they are one scalar per head and position because learned arrays are sized by (N, K, H) and
  cannot span the value dim h. Mega's X' W_h term inside the final SiLU is dropped (W_h would map
  H to h). Mega's output projections W_h, U_h and its
  relative-position bias are left to the layer. Non-causal uses the paper's bidirectional EMA.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    ema_alpha, ema_delta: `[2, K, H, ndim]` logits of α, δ (0: forward EMA, 1: backward EMA).
    ema_beta, ema_eta: `[2, K, H, ndim]` expansion and readout vectors.
    query_kappa, query_mu: `[N, H]`; key_kappa, key_mu: `[K, H]` per-channel scale and offset.
    reset_gate_weight, update_gate_weight: `[N, H]`; reset_gate_bias, update_gate_bias: `[N]`.
    chunk_size: attend only within chunks of this many positions (counted from each packed
      document's start): cost O(T·c). None: full attention.
    causal, segment_ids, q_offset, kv_lengths, scale: the common contract (scale defaults to H^-½).
    implementation: "reference" (EMA scan, dense attention) or "xla" (FFT EMA, chunks as a batch of
      `[c, c]` problems in a full forward, otherwise chunked flex attention).

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "mega_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  impl = checks.check_implementation(op, implementation)
  params = dict(zip(_MEGA_PARAMS, (ema_alpha, ema_delta, ema_beta, ema_eta, query_kappa, query_mu,
                                   key_kappa, key_mu, reset_gate_weight, reset_gate_bias,
                                   update_gate_weight, update_gate_bias)))
  ndim = jnp.shape(ema_alpha)[-1]
  ema_shape = ((2, K, H, ndim), "[2, K, H, ndim]")
  _check_params(op, {"ema_alpha": ema_shape, "ema_delta": ema_shape, "ema_beta": ema_shape,
                     "ema_eta": ema_shape, "query_kappa": ((N, H), "[N, H]"),
                     "query_mu": ((N, H), "[N, H]"), "key_kappa": ((K, H), "[K, H]"),
                     "key_mu": ((K, H), "[K, H]"), "reset_gate_weight": ((N, H), "[N, H]"),
                     "update_gate_weight": ((N, H), "[N, H]"), "reset_gate_bias": ((N,), "[N]"),
                     "update_gate_bias": ((N,), "[N]")}, params)
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"{op}: `chunk_size` must be >= 1 or None, got {chunk_size}")
  if segment_ids is not None and (isinstance(segment_ids, (tuple, list)) or T != S
                                  or not checks.is_static_zero(q_offset)):
    raise ValueError(f"{op}: `segment_ids` must be one [B, T] array for a full self-attention "
                     "forward (T == S, q_offset == 0)")
  _check_self(op, T, S, q_offset, kv_lengths)
  scale = H ** -0.5 if scale is None else scale

  valid = _key_valid(B, S, kv_lengths)[..., None, None]
  # Cache slots past kv_lengths hold garbage: zero them so the (bidirectional) EMA cannot read them.
  kf = jnp.where(valid, k.astype(jnp.float32), 0.0)
  vf = jnp.where(valid, v.astype(jnp.float32), 0.0)
  ema = multidim_ema(kf, ema_alpha, ema_delta, ema_beta, ema_eta, causal=causal,
                     segment_ids=segment_ids, implementation=impl)
  z = jax.nn.silu(ema)
  keys = key_kappa.astype(jnp.float32) * z + key_mu.astype(jnp.float32)
  pos = _positions(B, T, q_offset)
  queries = (query_kappa.astype(jnp.float32) * _to_query_heads(_at_positions(z, pos), N)
             + query_mu.astype(jnp.float32))
  values = jax.nn.silu(vf)

  if (impl == "xla" and chunk_size is not None and segment_ids is None and T == S
      and checks.is_static_zero(q_offset)):
    o = _chunked_blocks(queries, keys, values, causal=causal, kv_lengths=kv_lengths,
                        chunk_size=chunk_size, scale=scale)
  else:
    mods = [contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset, segment_ids=segment_ids,
                          kv_lengths=kv_lengths, op=op)]
    if chunk_size is not None:
      if segment_ids is None:
        mods.append(masks.chunked(chunk_size, offset=pos[:, 0]))
      else:
        cid = _segment_chunk_ids(segment_ids, S, chunk_size)
        mods.append(lambda b, n, qi, ki: cid[b, qi] == cid[b, ki])
    o = flex.flex_attention(queries, keys, values, mask_mod=masks.combine_masks(*mods), scale=scale,
                            implementation=impl)

  # Mega computes both gates from the EMA output X' of the token (eqs. (11)-(12)).
  ema_q = _to_query_heads(_at_positions(ema, pos), N)
  gate = lambda w, b: (jnp.einsum("btnh,nh->btn", ema_q, w.astype(jnp.float32))
                       + b.astype(jnp.float32))
  reset = jax.nn.silu(gate(reset_gate_weight, reset_gate_bias))[..., None]
  update = jax.nn.sigmoid(gate(update_gate_weight, update_gate_bias))[..., None]
  residual = _to_query_heads(_at_positions(vf, pos), N)
  out = update * jax.nn.silu(reset * o) + (1.0 - update) * residual
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------------
# SHA-RNN: single-headed attention with sigmoid gates and a query-only projection


def sha_rnn_attention(q, k, v, *, query_kernel, query_bias, query_ln_scale, query_ln_bias, q_gate,
                      k_gate, v_gate, causal: bool = True, segment_ids=None, q_offset=0,
                      kv_lengths=None, scale=None, implementation: Optional[str] = None,
                      ln_eps: float = 1e-12):
  """SHA-RNN attention: causal single-head attention over a memory, gated q/k/v, projected query.

  Paper: Merity, "Single Headed Attention RNN: Stop Thinking With Your Head", arXiv:1911.11423
  (section 3 and its reference code). Per head n (key/value head g = n // (N/K)):

      q' = LayerNorm(q W_n + b_n) ⊙ s_n + c_n           only the query is projected (then normalized)
      Q = σ(g_q) ⊙ q',   K = σ(g_k) ⊙ k,   V = σ(g_v) · v
      O = softmax(scale · Q Kᵀ, causal) V

  The memory is the key/value stream: the current tokens plus any earlier ones in front of them
  (`q_offset`, a KV cache), as the paper's memory of past hidden states. The paper has one head; each
  of the N heads here is such a head. Adaptation: the value gate σ(g_v) is one scalar per key/value
  head (learned arrays are sized by (N, K, H), not h), and the paper's overparametrized value gate
  (sigmoid·tanh of a linear map of σ(g_v)) is folded into that scalar. The gates start at 0
  (σ = ½), as in the paper's code; `query_kernel` starts at the identity because the layer has
  already projected q.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    query_kernel: `[N, H, H]`; query_bias, query_ln_scale, query_ln_bias, q_gate: `[N, H]`.
    k_gate: `[K, H]`; v_gate: `[K]` (gate logits).
    causal: must be True (the paper's language-model attention).
    segment_ids, q_offset, kv_lengths, scale, implementation: as `dot_product_attention`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "sha_rnn_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if not causal:
    raise ValueError(f"{op}: the SHA-RNN attention is causal; call with causal=True")
  _check_params(op, {"query_kernel": ((N, H, H), "[N, H, H]"), "query_bias": ((N, H), "[N, H]"),
                     "query_ln_scale": ((N, H), "[N, H]"), "query_ln_bias": ((N, H), "[N, H]"),
                     "q_gate": ((N, H), "[N, H]"), "k_gate": ((K, H), "[K, H]"),
                     "v_gate": ((K,), "[K]")},
                dict(query_kernel=query_kernel, query_bias=query_bias,
                     query_ln_scale=query_ln_scale, query_ln_bias=query_ln_bias, q_gate=q_gate,
                     k_gate=k_gate, v_gate=v_gate))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  qp = jnp.einsum("btnh,nhd->btnd", f32(q), f32(query_kernel)) + f32(query_bias)
  qp = _layer_norm(qp, ln_eps) * f32(query_ln_scale) + f32(query_ln_bias)
  qg = jax.nn.sigmoid(f32(q_gate)) * qp
  kg = jax.nn.sigmoid(f32(k_gate)) * f32(k)
  vg = jax.nn.sigmoid(f32(v_gate))[:, None] * f32(v)
  out = dot_product_attention(qg, kg, vg, causal=True, segment_ids=segment_ids, q_offset=q_offset,
                              kv_lengths=kv_lengths, scale=scale, implementation=implementation)
  return out.astype(q.dtype)


def boom_feedforward(x, kernel, bias, *, expansion: int = 4):
  """The SHA-RNN's Boom layer: `u = GELU(x W + b) ∈ R^{expansion·d}`, split into `expansion`
  vectors of size d and summed (no down-projection), arXiv:1911.11423 section 3.

  Args:
    x: `[..., d]`; kernel: `[d, expansion·d]`; bias: `[expansion·d]`.
  Returns:
    `[..., d]` in x's dtype.
  """
  d = x.shape[-1]
  checks.check_shape("boom_feedforward", "kernel", kernel, (d, expansion * d), "[d, expansion·d]")
  checks.check_shape("boom_feedforward", "bias", bias, (expansion * d,), "[expansion·d]")
  u = jax.nn.gelu(jnp.asarray(x, jnp.float32) @ jnp.asarray(kernel, jnp.float32)
                  + jnp.asarray(bias, jnp.float32), approximate=False)
  return jnp.sum(u.reshape(x.shape[:-1] + (expansion, d)), axis=-2).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Recurrent Attention Network: window-by-window attention with a carried Global Perception Cell


def gpc_states(k, v, *, gpc_query, gpc_key, window: int, kv_lengths=None, scale=None,
               implementation: Optional[str] = None):
  """The Global Perception Cell carried across windows (RAN, arXiv:2306.01018), per key/value head.

  The GPC has a key part `g_k ∈ R^H` and a value part `g_v ∈ R^h`, starting at (`gpc_key`, 0). At
  window i, the GPC reads its slot and the window with the learned query `gpc_query`:

      [ĝ_k ‖ ĝ_v] = softmax(scale · gpc_query [g_k; k_win]ᵀ) [g_k ‖ g_v; k_win ‖ v_win]
      g^(i) = LayerNorm(ĝ + g^(i-1))          (each part; the paper's residual memory update)

  a `lax.scan` over windows whose step sees only `window + 1` keys. Windows with no valid key (past
  `kv_lengths`) leave the GPC unchanged.

  Args:
    k: `[B, S, K, H]`; v: `[B, S, K, h]`; gpc_query, gpc_key: `[K, H]`.

  Returns:
    `((gk_in [B, nW, K, H], gv_in [B, nW, K, h]), (gk [B, K, H], gv [B, K, h]))`: the GPC each of the
    nW = ⌈S / window⌉ windows reads (the one carried from the windows before it), and the final,
    document-level GPC. float32.
  """
  B, S, K, H = k.shape
  h = v.shape[-1]
  W = window
  nw = -(-S // W)
  pad = nw * W - S
  valid = jnp.pad(_key_valid(B, S, kv_lengths), ((0, 0), (0, pad)))
  per_window = lambda x: jnp.moveaxis(
      jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape((B, nw, W) + x.shape[2:]),
      1, 0)
  kw = per_window(jnp.where(valid[:, :S, None, None], jnp.asarray(k, jnp.float32), 0.0))
  vw = per_window(jnp.where(valid[:, :S, None, None], jnp.asarray(v, jnp.float32), 0.0))
  validw = jnp.moveaxis(valid.reshape(B, nw, W), 1, 0)
  query = jnp.broadcast_to(jnp.asarray(gpc_query, jnp.float32), (B, 1, K, H))

  def step(carry, inputs):
    gk, gv = carry
    k_win, v_win, valid_win = inputs
    keys = jnp.concatenate([gk[:, None], k_win], axis=1)
    values = jnp.concatenate([jnp.concatenate([gk, gv], -1)[:, None],
                              jnp.concatenate([k_win, v_win], -1)], axis=1)
    mask = jnp.concatenate([jnp.ones((B, 1), bool), valid_win], axis=1)[:, None, None, :]
    read = dot_product_attention(query, keys, values, mask=mask, scale=scale,
                                 implementation=implementation)[:, 0]
    new_k = _layer_norm(read[..., :H] + gk)
    new_v = _layer_norm(read[..., H:] + gv)
    any_valid = jnp.any(valid_win, axis=1)[:, None, None]
    new = (jnp.where(any_valid, new_k, gk), jnp.where(any_valid, new_v, gv))
    return new, (gk, gv)

  init = (jnp.broadcast_to(jnp.asarray(gpc_key, jnp.float32), (B, K, H)), jnp.zeros((B, K, h)))
  final, (gk_in, gv_in) = jax.lax.scan(step, init, (kw, vw, validw))
  return (jnp.moveaxis(gk_in, 0, 1), jnp.moveaxis(gv_in, 0, 1)), final


def _ran_windows(q, k, v, gk_in, gv_in, *, window, causal, kv_lengths, scale):
  """Full forward (T == S, q_offset 0): each window is one attention over [GPC; its tokens], a batch
  of `[W, W + 1]` problems."""
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[-1]
  W = window
  nw = gk_in.shape[1]
  pad = nw * W - T
  fold = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape((B, nw, W) + x.shape[2:])
  keys = jnp.concatenate([gk_in[:, :, None], fold(k.astype(jnp.float32))], axis=2)
  values = jnp.concatenate([gv_in[:, :, None], fold(v.astype(jnp.float32))], axis=2)
  lengths = jnp.full((B,), T, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  starts = jnp.arange(nw, dtype=jnp.int32) * W
  win_lengths = (1 + jnp.clip(lengths[:, None] - starts[None], 0, W)).reshape(B * nw)
  # q_offset = 1: the GPC sits at slot 0, before the window's first token, visible to all of them.
  out = dot_product_attention(fold(q.astype(jnp.float32)).reshape(B * nw, W, N, H),
                              keys.reshape(B * nw, W + 1, K, H), values.reshape(B * nw, W + 1, K, h),
                              causal=causal, q_offset=1, kv_lengths=win_lengths, scale=scale,
                              implementation="xla")
  return out.reshape(B, nw * W, N, h)[:, :T]


def _ran_masked(q, k, v, gk_in, gv_in, *, window, causal, q_offset, kv_lengths, scale,
                implementation):
  """Any query positions (a cache): attention over the query's window of the key stream, merged with
  its window's GPC slot as one extra key (`merge_attention_states`)."""
  B, T, N, H = q.shape
  S = k.shape[1]
  pos = _positions(B, T, q_offset)
  mask = masks.combine_masks(
      contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                    op="recurrent_attention_network"),
      masks.chunked(window, offset=pos[:, 0]))
  kf = jnp.where(_key_valid(B, S, kv_lengths)[..., None, None], k.astype(jnp.float32), 0.0)
  vf = jnp.where(_key_valid(B, S, kv_lengths)[..., None, None], v.astype(jnp.float32), 0.0)
  o_tok, lse_tok = flex.flex_attention(q.astype(jnp.float32), kf, vf, mask_mod=mask, scale=scale,
                                       return_residuals=True, implementation=implementation)
  win = pos // window
  gk = _to_query_heads(_at_positions(gk_in, win), N)
  gv = _to_query_heads(_at_positions(gv_in, win), N)
  lse_gpc = scale * jnp.sum(q.astype(jnp.float32) * gk, axis=-1)
  out, _ = merge_attention_states([o_tok, gv], [lse_tok, lse_gpc])
  return out


def recurrent_attention_network(q, k, v, *, gpc_query, gpc_key, window: int = 64,
                                causal: bool = False, segment_ids=None, q_offset=0,
                                kv_lengths=None, scale=None, implementation: Optional[str] = None,
                                return_document: bool = False):
  """Recurrent Attention Network: window-by-window self-attention with a carried Global Perception
  Cell (GPC) that joins each window as an extra key/value.

  Paper: Li et al., "Recurrent Attention Networks for Long-text Modeling", arXiv:2306.01018. The
  sequence is cut into windows of `window` positions; a token at position p in window i = p // W sees

      softmax(scale · q_p [g_k^(i-1); k_win(i)]ᵀ, causal within the window) [g_v^(i-1); v_win(i)]

  where g^(i-1) is the GPC after windows 0..i-1 (`gpc_states`: a scan over windows, each step
  bounded by the window). Cost O(T·W) plus the O(S·W) GPC scan; causal is exact for language
  modelling since a window only reads GPCs of earlier windows.

  Head-space adaptation: the GPC vector of the paper lives in the model dimension; here it is a key
  part (H) and a value part (h) per key/value head, the GPC's read of a window mixes keys and values
  with the same weights, and the GPC's query is a learned vector per key/value head. Packed sequences
  are not supported (the GPC would have to restart and windows realign at each document).

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`; self-attention (T == S), or a query
      block over a KV cache (`q_offset`, `kv_lengths`).
    gpc_query, gpc_key: `[K, H]` learned: the GPC's query, and its initial key (its value starts 0).
    window: window length W.
    return_document: also return the document-level GPC output `[B, K, h]` (its value part after
      the last window with a valid key).

  Returns:
    `[B, T, N, h]` in q's dtype (and the document output when asked).
  """
  op = "recurrent_attention_network"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  impl = checks.check_implementation(op, implementation)
  if window < 1:
    raise ValueError(f"{op}: `window` must be >= 1, got {window}")
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported: the GPC carries "
                     "across windows; run documents as separate batch rows")
  _check_params(op, {"gpc_query": ((K, H), "[K, H]"), "gpc_key": ((K, H), "[K, H]")},
                dict(gpc_query=gpc_query, gpc_key=gpc_key))
  _check_self(op, T, S, q_offset, kv_lengths)
  scale = H ** -0.5 if scale is None else scale
  (gk_in, gv_in), (_, gv_final) = gpc_states(k, v, gpc_query=gpc_query, gpc_key=gpc_key,
                                             window=window, kv_lengths=kv_lengths, scale=scale,
                                             implementation=impl)
  if impl == "xla" and T == S and checks.is_static_zero(q_offset):
    out = _ran_windows(q, k, v, gk_in, gv_in, window=window, causal=causal, kv_lengths=kv_lengths,
                       scale=scale)
  else:
    out = _ran_masked(q, k, v, gk_in, gv_in, window=window, causal=causal, q_offset=q_offset,
                      kv_lengths=kv_lengths, scale=scale, implementation=impl)
  out = out.astype(q.dtype)
  return (out, gv_final.astype(q.dtype)) if return_document else out


# ----------------------------------------------------------------------------------------------------
# Registration


MEGA_NDIM = 16   # the paper's EMA expansion dimension


def _alternating_beta(key, shape, dtype=jnp.float32):
  # Mega's code starts β at ±1 alternating along the expansion dim (plus small noise), so the ndim
  # EMA components do not start identical.
  sign = jnp.where(jnp.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
  return (sign + 0.02 * jax.random.normal(key, shape)).astype(dtype)


def _fan_in_normal(key, shape, dtype=jnp.float32):
  # A gate weight reads an H-vector: std H^-½ keeps its logit O(1).
  return (jax.random.normal(key, shape) * shape[-1] ** -0.5).astype(dtype)


def _identity_kernel(key, shape, dtype=jnp.float32):
  del key
  return jnp.broadcast_to(jnp.eye(shape[-1]), shape).astype(dtype)


_init = jax.nn.initializers
_MEGA_SPECS = (
    ParamSpec("ema_alpha", lambda N, K, H: (2, K, H, MEGA_NDIM), _init.normal(0.2)),
    ParamSpec("ema_delta", lambda N, K, H: (2, K, H, MEGA_NDIM), _init.normal(0.2)),
    ParamSpec("ema_beta", lambda N, K, H: (2, K, H, MEGA_NDIM), _alternating_beta),
    ParamSpec("ema_eta", lambda N, K, H: (2, K, H, MEGA_NDIM), _init.normal(MEGA_NDIM ** -0.5)),
    ParamSpec("query_kappa", lambda N, K, H: (N, H), _init.ones),
    ParamSpec("query_mu", lambda N, K, H: (N, H), _init.zeros),
    ParamSpec("key_kappa", lambda N, K, H: (K, H), _init.ones),
    ParamSpec("key_mu", lambda N, K, H: (K, H), _init.zeros),
    ParamSpec("reset_gate_weight", lambda N, K, H: (N, H), _fan_in_normal),
    ParamSpec("reset_gate_bias", lambda N, K, H: (N,), _init.zeros),
    ParamSpec("update_gate_weight", lambda N, K, H: (N, H), _fan_in_normal),
    ParamSpec("update_gate_bias", lambda N, K, H: (N,), _init.zeros),
)
_SHA_SPECS = (
    ParamSpec("query_kernel", lambda N, K, H: (N, H, H), _identity_kernel),
    ParamSpec("query_bias", lambda N, K, H: (N, H), _init.zeros),
    ParamSpec("query_ln_scale", lambda N, K, H: (N, H), _init.ones),
    ParamSpec("query_ln_bias", lambda N, K, H: (N, H), _init.zeros),
    ParamSpec("q_gate", lambda N, K, H: (N, H), _init.zeros),
    ParamSpec("k_gate", lambda N, K, H: (K, H), _init.zeros),
    ParamSpec("v_gate", lambda N, K, H: (K,), _init.zeros),
)
_RAN_SPECS = (
    ParamSpec("gpc_query", lambda N, K, H: (K, H), _init.normal(1.0)),
    ParamSpec("gpc_key", lambda N, K, H: (K, H), _init.normal(1.0)),
)


_conformance = functools.partial(example_params, N=4, K=2, H=8)

register(Mechanism(
    name="mega_attention", fn=mega_attention, family="recurrent-memory", seeds=(168,),
    paper="Mega: Moving Average Equipped Gated Attention", arxiv="2209.10655",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, packed=True,
    complexity="O(T·S); O(T·c) chunked", implementations=("xla", "reference"),
    params=_MEGA_SPECS, example=lambda: dict(chunk_size=8, **_conformance(_MEGA_SPECS, perturb=0.3)),
    # The EMA state per channel, plus the keys of the current chunk (all keys when unchunked).
    state_size=lambda T, N, K, H, h, kw: (K * H * MEGA_NDIM + min(kw.get("chunk_size") or T, T)
                                          * K * (H + h))))

register(Mechanism(
    name="sha_rnn_block", fn=sha_rnn_attention, family="recurrent-memory", seeds=(56,),
    paper="Single Headed Attention RNN: Stop Thinking With Your Head", arxiv="1911.11423",
    patterns=frozenset({"causal_self", "causal_cross"}), gqa=True, decode=True, packed=True,
    complexity="O(T·S)", implementations=("xla", "reference"), params=_SHA_SPECS,
    example=lambda: _conformance(_SHA_SPECS, perturb=0.5)))

register(Mechanism(
    name="recurrent_attention_network", fn=recurrent_attention_network, family="recurrent-memory",
    seeds=(65,), paper="Recurrent Attention Networks for Long-text Modeling", arxiv="2306.01018",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, packed=False,
    complexity="O(T·W)", implementations=("xla", "reference"), params=_RAN_SPECS,
    example=lambda: dict(window=5, **_conformance(_RAN_SPECS)),
    defaults=dict(window=64),
    # The carried global cell (one key and value), plus the current window's keys and values.
    state_size=lambda T, N, K, H, h, kw: (1 + min(kw["window"], T)) * K * (H + h)))
