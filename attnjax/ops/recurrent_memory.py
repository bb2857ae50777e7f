"""Recurrent-memory attention: Mega (#168) and the SHA-RNN attention (#56), each in the head space of
the operator contract (the Recurrent Attention Network is in `attnjax.ops.ran`).

Both carry information along the sequence beyond one softmax over the current tokens: Mega through a
damped exponential moving average of the inputs, the SHA-RNN through a memory of past states read by
a gated single-head attention. The softmax parts reuse `attnjax.core.flex.flex_attention` /
`attnjax.ops.dot_product_attention`.

Head-space adaptation (the contract gives only q, k, v): what a paper computes from the layer input
is computed from the head vectors given (per key/value head for the key and value streams, per query
head for the query stream). A learned array over the value width h has h = H in the layer (its head
dim, the registry's ParamSpec); an operator called directly takes it at the width of `v`.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import masks
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


def _rotary(x, pos: jax.Array) -> jax.Array:
  """Mega's rotary map of a learned vector at absolute positions (its rotary relative-position bias):
  `x: [G, H]` (H even), `pos: [B, L]` → `[B, L, G, H]`, channel pairs (c, c + H/2) rotated by the
  angle `pos · 10000^(-c / (H/2))`."""
  half = x.shape[-1] // 2
  freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / half))
  angle = pos.astype(jnp.float32)[..., None, None] * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def mega_attention(q, k, v, *, ema_alpha, ema_delta, ema_beta, ema_eta, ema_omega, z_kernel, z_bias,
                   query_kappa, query_mu, key_kappa, rel_alpha, rel_beta, reset_kernel,
                   reset_bias, update_kernel, update_bias, candidate_kernel, candidate_attn_kernel,
                   candidate_bias, chunk_size: Optional[int] = None, causal: bool = False,
                   segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                   implementation: Optional[str] = None):
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

  Returns:
    `[B, T, N, h]` in q's dtype; zeros at query positions past `kv_lengths`.
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
  _check_table(op, _MEGA_TABLE, p, N=N, K=K, H=H, h=h, ndim=jnp.shape(ema_alpha)[-1])
  if H % 2:
    raise ValueError(f"{op}: the rotary relative-position bias pairs the channels of the key head "
                     f"dim H, which must be even; got k {k.shape}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"{op}: `chunk_size` must be >= 1 or None, got {chunk_size}")
  if segment_ids is not None and (isinstance(segment_ids, (tuple, list)) or T != S
                                  or not checks.is_static_zero(q_offset)):
    raise ValueError(f"{op}: `segment_ids` must be one [B, T] array for a full self-attention "
                     "forward (T == S, q_offset == 0)")
  _check_self(op, T, S, q_offset, kv_lengths)
  scale = H ** -0.5 if scale is None else scale
  p = {name: jnp.asarray(x, jnp.float32) for name, x in p.items()}

  valid = _key_valid(B, S, kv_lengths)[..., None, None]
  # Cache slots past kv_lengths hold garbage: zero them so the (bidirectional) EMA cannot read them.
  kf = jnp.where(valid, k.astype(jnp.float32), 0.0)
  vf = jnp.where(valid, v.astype(jnp.float32), 0.0)
  ema = multidim_ema(kf, p["ema_alpha"], p["ema_delta"], p["ema_beta"], p["ema_eta"],
                     causal=causal, segment_ids=segment_ids, implementation=impl)
  x_ema = jax.nn.silu(ema + p["ema_omega"] * kf)                                   # X'
  z = jax.nn.silu(jnp.einsum("bskh,khd->bskd", x_ema, p["z_kernel"]) + p["z_bias"])
  pos = _positions(B, T, q_offset)
  key_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (B, S))
  keys = jnp.concatenate([p["key_kappa"] * z, _rotary(p["rel_beta"], key_pos)], -1)
  z_q = _to_query_heads(_at_positions(z, pos), N)
  queries = jnp.concatenate([scale * (p["query_kappa"] * z_q + p["query_mu"]),
                             _rotary(p["rel_alpha"], pos)], -1)
  values = jax.nn.silu(vf)

  if (impl == "xla" and chunk_size is not None and segment_ids is None and T == S
      and checks.is_static_zero(q_offset)):
    o = _chunked_blocks(queries, keys, values, causal=causal, kv_lengths=kv_lengths,
                        chunk_size=chunk_size, scale=1.0)
  else:
    mods = [contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset, segment_ids=segment_ids,
                          kv_lengths=kv_lengths, op=op)]
    if chunk_size is not None:
      if segment_ids is None:
        mods.append(masks.chunked(chunk_size, offset=pos[:, 0]))
      else:
        cid = _segment_chunk_ids(segment_ids, S, chunk_size)
        mods.append(lambda b, n, qi, ki: cid[b, qi] == cid[b, ki])
    o = flex.flex_attention(queries, keys, values, mask_mod=masks.combine_masks(*mods), scale=1.0,
                            implementation=impl)

  # The gates and the candidate read the EMA output X' of the query's own token.
  x_q = _to_query_heads(_at_positions(x_ema, pos), N)
  dense = lambda name: (jnp.einsum("btnh,nhd->btnd", x_q, p[name + "_kernel"])
                        + p[name + "_bias"])
  reset = jax.nn.silu(dense("reset"))
  update = jax.nn.sigmoid(dense("update"))
  candidate = jax.nn.silu(dense("candidate")
                          + jnp.einsum("btnd,nde->btne", reset * o, p["candidate_attn_kernel"]))
  residual = _to_query_heads(_at_positions(vf, pos), N)
  out = update * candidate + (1.0 - update) * residual
  if kv_lengths is not None:
    # A padding query sees no key (its own slot is hidden): zeros, as every mechanism gives there.
    out = jnp.where((pos < jnp.asarray(kv_lengths, jnp.int32)[:, None])[..., None, None], out, 0.0)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------------
# SHA-RNN: the single-headed attention (the block's Boom feed-forward is a separate layer)


def sha_rnn_attention(q, k, v, *, query_ln_scale, query_ln_bias, q_gate, k_gate, v_gate,
                      v_gate_kernel, v_gate_bias, causal: bool = True, segment_ids=None,
                      q_offset=0, kv_lengths=None, scale=None, implementation: Optional[str] = None,
                      ln_eps: float = 1e-12):
  """SHA-RNN attention: causal single-head attention over a memory, LayerNorm'd query, vector gates.

  Paper: Merity, "Single Headed Attention RNN: Stop Thinking With Your Head", arXiv:1911.11423,
  section 3 (the SHA attention figure) and the author's code (smerity/sha-rnn: `Attention` with
  only the query projected). Per query head n (key/value head g = n // (N/K)):

      Q   = σ(s_q) ⊙ (LayerNorm(q) ⊙ λ + β)      q: the query projection of the input; LN eps 1e-12
      K   = σ(s_k) ⊙ k
      [c ‖ f] = σ(s_v) W_v + b_v,   g_v = σ(f) ⊙ tanh(c)    over-parametrized value gate
      V   = g_v ⊙ v
      O   = softmax(scale · Q Kᵀ, causal) V

  s_q, s_k ∈ R^H and s_v ∈ R^h are gate vectors, one logit per channel (they start at 0, as in
  the code); W_v `[h, 2h]`, b_v `[2h]` is the over-parametrization of the value gate (a function of
  parameters only, so it changes the training dynamics, not the function class). The memory is the
  key/value stream: the current tokens plus earlier ones in front of them (`q_offset`, a KV cache),
  as the paper's memory of past states. The SHA-RNN block around this attention (LSTM, LayerNorms,
  residuals and the Boom feed-forward `GELU(x W) summed over chunks`) is a model's, not the
  mechanism's.

  Adaptation: the query's linear map is the layer's query projection (the operator normalizes the
  q it gets); the paper's keys and values are the memory itself, here the layer's k and v. The
  paper has one head; each of the N heads here is such a head. Arrays over the value width h are
  sized with h = H in the layer (its head dim); called directly, they take the value width of `v`.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    query_ln_scale, query_ln_bias, q_gate: `[N, H]` (λ, β, s_q); k_gate: `[K, H]` (s_k);
    v_gate: `[K, h]` (s_v); v_gate_kernel: `[K, h, 2h]`, v_gate_bias: `[K, 2h]` (W_v, b_v).
    causal: must be True (the paper's language-model attention).
    segment_ids, q_offset, kv_lengths, scale, implementation: as `dot_product_attention`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "sha_rnn_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if not causal:
    raise ValueError(f"{op}: the SHA-RNN attention is causal; call with causal=True")
  p = dict(query_ln_scale=query_ln_scale, query_ln_bias=query_ln_bias, q_gate=q_gate,
           k_gate=k_gate, v_gate=v_gate, v_gate_kernel=v_gate_kernel, v_gate_bias=v_gate_bias)
  _check_table(op, _SHA_TABLE, p, N=N, K=K, H=H, h=h)
  p = {name: jnp.asarray(x, jnp.float32) for name, x in p.items()}
  query = _layer_norm(q.astype(jnp.float32), ln_eps) * p["query_ln_scale"] + p["query_ln_bias"]
  cf = jnp.einsum("gd,gde->ge", jax.nn.sigmoid(p["v_gate"]), p["v_gate_kernel"]) + p["v_gate_bias"]
  value_gate = jax.nn.sigmoid(cf[:, h:]) * jnp.tanh(cf[:, :h])                     # [K, h]
  out = dot_product_attention(jax.nn.sigmoid(p["q_gate"]) * query,
                              jax.nn.sigmoid(p["k_gate"]) * k.astype(jnp.float32),
                              value_gate * v.astype(jnp.float32), causal=True,
                              segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                              scale=scale, implementation=implementation)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Registration


MEGA_NDIM = 16   # the paper's EMA expansion dimension


def _alternating_beta(key, shape, dtype=jnp.float32):
  # Mega's code starts β at ±1 alternating along the expansion dim (plus small noise), so the ndim
  # EMA components do not start identical.
  sign = jnp.where(jnp.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
  return (sign + 0.02 * jax.random.normal(key, shape)).astype(dtype)


def _fan_in_normal(key, shape, dtype=jnp.float32):
  # A kernel `[..., in, out]`: std in^-½ keeps each output O(1).
  return (jax.random.normal(key, shape) * shape[-2] ** -0.5).astype(dtype)


_init = jax.nn.initializers
# (name, shape(N, K, H, h, ndim), shape in letters, init): one table gives the registry's ParamSpecs
# (h = H, the layer's head dim), the operators' shape checks and examples at any value width h.
_MEGA_TABLE = (
    ("ema_alpha", lambda N, K, H, h, n: (2, K, H, n), "[2, K, H, ndim]", _init.normal(0.2)),
    ("ema_delta", lambda N, K, H, h, n: (2, K, H, n), "[2, K, H, ndim]", _init.normal(0.2)),
    ("ema_beta", lambda N, K, H, h, n: (2, K, H, n), "[2, K, H, ndim]", _alternating_beta),
    ("ema_eta", lambda N, K, H, h, n: (2, K, H, n), "[2, K, H, ndim]",
     _init.normal(MEGA_NDIM ** -0.5)),
    ("ema_omega", lambda N, K, H, h, n: (K, H), "[K, H]", _init.normal(1.0)),
    ("z_kernel", lambda N, K, H, h, n: (K, H, H), "[K, H, H]", _fan_in_normal),
    ("z_bias", lambda N, K, H, h, n: (K, H), "[K, H]", _init.zeros),
    ("query_kappa", lambda N, K, H, h, n: (N, H), "[N, H]", _init.ones),
    ("query_mu", lambda N, K, H, h, n: (N, H), "[N, H]", _init.zeros),
    ("key_kappa", lambda N, K, H, h, n: (K, H), "[K, H]", _init.ones),
    ("rel_alpha", lambda N, K, H, h, n: (N, H), "[N, H]", _init.normal(0.02)),
    ("rel_beta", lambda N, K, H, h, n: (K, H), "[K, H]", _init.normal(0.02)),
    ("reset_kernel", lambda N, K, H, h, n: (N, H, h), "[N, H, h]", _fan_in_normal),
    ("reset_bias", lambda N, K, H, h, n: (N, h), "[N, h]", _init.zeros),
    ("update_kernel", lambda N, K, H, h, n: (N, H, h), "[N, H, h]", _fan_in_normal),
    ("update_bias", lambda N, K, H, h, n: (N, h), "[N, h]", _init.zeros),
    ("candidate_kernel", lambda N, K, H, h, n: (N, H, h), "[N, H, h]", _fan_in_normal),
    ("candidate_attn_kernel", lambda N, K, H, h, n: (N, h, h), "[N, h, h]", _fan_in_normal),
    ("candidate_bias", lambda N, K, H, h, n: (N, h), "[N, h]", _init.zeros),
)
_SHA_TABLE = (
    ("query_ln_scale", lambda N, K, H, h, n: (N, H), "[N, H]", _init.ones),
    ("query_ln_bias", lambda N, K, H, h, n: (N, H), "[N, H]", _init.zeros),
    ("q_gate", lambda N, K, H, h, n: (N, H), "[N, H]", _init.zeros),
    ("k_gate", lambda N, K, H, h, n: (K, H), "[K, H]", _init.zeros),
    ("v_gate", lambda N, K, H, h, n: (K, h), "[K, h]", _init.zeros),
    ("v_gate_kernel", lambda N, K, H, h, n: (K, h, 2 * h), "[K, h, 2h]", _fan_in_normal),
    ("v_gate_bias", lambda N, K, H, h, n: (K, 2 * h), "[K, 2h]", _init.zeros),
)


def _table_specs(table, *, h=None) -> tuple[ParamSpec, ...]:
  """ParamSpecs from a table, the value width h = H (the layer's head dim) unless given."""
  return tuple(ParamSpec(name, lambda N, K, H, f=f: f(N, K, H, H if h is None else h, MEGA_NDIM),
                         init) for name, f, _, init in table)


def _check_table(op: str, table, params: dict, *, N, K, H, h, ndim=MEGA_NDIM):
  _check_params(op, {name: (f(N, K, H, h, ndim), letters) for name, f, letters, _ in table}, params)


def _table_example(table, *, N=4, K=2, H=8, h=6, seed=0, perturb=0.0) -> dict:
  """Concrete arrays for a table at the given sizes (by default the conformance suite's, whose value
  width is 6)."""
  return example_params(_table_specs(table, h=h), N=N, K=K, H=H, seed=seed, perturb=perturb)


_MEGA_SPECS = _table_specs(_MEGA_TABLE)
_SHA_SPECS = _table_specs(_SHA_TABLE)


register(Mechanism(
    name="mega_attention", fn=mega_attention, family="recurrent-memory", seeds=(168,),
    paper="Mega: Moving Average Equipped Gated Attention", arxiv="2209.10655",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, packed=True,
    # Q and K both come from the EMA of the input (the key stream); q is never read.
    reads=frozenset({"k", "v"}),
    complexity="O(T·S); O(T·c) chunked", implementations=("xla", "reference"),
    params=_MEGA_SPECS,
    example=lambda: dict(chunk_size=8, **_table_example(_MEGA_TABLE, perturb=0.3)),
    # The EMA state per channel, plus the keys of the current chunk (all keys when unchunked).
    state_size=lambda T, N, K, H, h, kw: (K * H * MEGA_NDIM + min(kw.get("chunk_size") or T, T)
                                          * K * (H + h))))

register(Mechanism(
    name="sha_rnn_attention", fn=sha_rnn_attention, family="recurrent-memory", seeds=(56,),
    paper="Single Headed Attention RNN: Stop Thinking With Your Head", arxiv="1911.11423",
    patterns=frozenset({"causal_self", "causal_cross"}), gqa=True, decode=True, packed=True,
    complexity="O(T·S)", implementations=("xla", "reference"), params=_SHA_SPECS,
    example=lambda: _table_example(_SHA_TABLE, perturb=0.5)))
