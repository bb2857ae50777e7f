"""Attention-free token mixers that papers offer as drop-in replacements for self-attention.

Each paper's mixer reads one stream, the layer input x, with no query-key scores. Here that stream
is each head's values `v` (the head-space image of x): every mixer here declares
`reads=frozenset({"v"})`, never depends on `q` or `k` (it takes them only for their shapes and the
common call contract of `attnjax.registry`), and `attnjax.nn.MultiHeadAttention` creates no query
or key projection for it. Self-attention only: the keys are the queries' own tokens, T == S, or a
KV cache of them when decoding. There are no scores, so `scale` must stay None (anything else is a
ValueError). Learned arrays are explicit keyword arguments (`Mechanism.params`; the layer creates
them, with the value width h equal to the head dim H as in that layer). Arrays indexed by position
have a fixed maximum length L (their first dimension); a longer sequence is a clear error.

  fftnet_spectral_filter     FFT along the sequence, adaptive spectral filter, modReLU, inverse FFT
                             (Fein-Ashley, "The FFT Strikes Back", arXiv:2502.18394).
  causal_pairwise_mixer      a learned function of each token and its predecessor, plus a
                             running mean (Hilsenbek, "Breaking the Attention Bottleneck",
                             arXiv:2406.10906).
  ffn_attention_replacement  a shallow FFN over the flattened, padded sequence (Bozic et al.,
                             "Rethinking Attention", arXiv:2311.10642), trained end to end here
                             (the paper's distillation from attention is not implemented).

Packed sequences (`segment_ids`) are taken as contiguous runs: a token mixes only tokens of its own
run, and positions (for position-indexed weights) restart at each run's first token. Every
statistic (context means, running sums) is per example: no example of a batch affects another.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.core import checks
from attnjax.core import implementations
from attnjax.registry import Mechanism, ParamSpec, register

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
# Maximum sequence length of the position-indexed arrays the Flax layer creates by default.
DEFAULT_MAX_LENGTH = 256
FFT_CONTEXT_HIDDEN = 32      # width of FFTNet's context MLP
FFN_HIDDEN = 64              # hidden width of the shallow FFN, per head


def _einsum(spec, *arrays):
  return jnp.einsum(spec, *arrays, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------------
# Shared input handling: shapes, GQA, padding, packed runs and the query rows of a KV cache.


@dataclasses.dataclass(frozen=True)
class _Prepared:
  """Float32 values in query-head layout and the sequence bookkeeping shared by the mixers.

  v: `[B, S, N, h]`, zero at hidden slots (at or past `kv_lengths`); q and k are never read.
  valid: `[B, S]` slots below `kv_lengths`. starts: `[B, S]` run start flags; start: `[B, S]` index
  of each slot's run start; pos: `[B, S]` position within the run. rows: `[B, T]` the slot of each
  query (`q_offset + i`); full_rows: True when rows are exactly `0 … S-1` (no gather needed).
  """
  v: jax.Array
  valid: jax.Array
  starts: jax.Array
  start: jax.Array
  pos: jax.Array
  rows: jax.Array
  full_rows: bool
  segmented: bool
  dims: tuple[int, ...]


def _prepare(op: str, q, k, v, *, segment_ids, q_offset, kv_lengths, scale,
             decode: bool) -> _Prepared:
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  _no_scale(op, scale)
  if jnp.ndim(q_offset) not in (0, 1) or (jnp.ndim(q_offset) == 1 and jnp.shape(q_offset) != (B,)):
    raise ValueError(f"{op}: `q_offset` must be an int or have shape [B] = [{B}], "
                     f"got shape {jnp.shape(q_offset)}")
  if not decode and T != S:
    raise ValueError(f"{op}: a token mixer is self-attention only: `k` and `v` must be the "
                     f"queries' own tokens (T == S), got T={T}, S={S}")
  if T > S:
    raise ValueError(f"{op}: {T} queries but only {S} key/value slots; over a KV cache the cache "
                     "holds the queries' own tokens (T <= S)")
  if isinstance(q_offset, (int, np.integer)) and not 0 <= q_offset <= S - T:
    raise ValueError(f"{op}: `q_offset` + T must be <= S = {S} (queries sit inside the cache), "
                     f"got q_offset={q_offset}, T={T}")
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)) or T != S:
      raise ValueError(f"{op}: `segment_ids` must be one [B, T] array for self-attention "
                       f"(T == S = {S}); got T={T}, S={S}")
    checks.check_shape(op, "segment_ids", segment_ids, (B, T), "[B, T]")
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")

  slots = jnp.arange(S)
  valid = (jnp.ones((B, S), bool) if kv_lengths is None
           else slots[None, :] < jnp.asarray(kv_lengths)[:, None])
  if segment_ids is None:
    starts = jnp.zeros((B, S), bool).at[:, 0].set(True)
    start = jnp.zeros((B, S), jnp.int32)
  else:
    seg = jnp.asarray(segment_ids)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = lax.cummax(jnp.where(starts, slots[None, :], 0), axis=1).astype(jnp.int32)
  pos = slots[None, :] - start
  full_rows = T == S and isinstance(q_offset, (int, np.integer)) and q_offset == 0
  rows = jnp.broadcast_to(jnp.reshape(jnp.asarray(q_offset), (-1, 1)) + jnp.arange(T), (B, T))
  rows = jnp.clip(rows, 0, S - 1)
  # jnp.where (not a product) keeps cache garbage such as 1e4 or inf out of every sum.
  hidden_v = jnp.where(valid[:, :, None, None], jnp.repeat(v.astype(_F32), N // K, axis=2), 0.0)
  return _Prepared(v=hidden_v, valid=valid, starts=starts, start=start, pos=pos,
                   rows=rows, full_rows=full_rows, segmented=segment_ids is not None,
                   dims=(B, T, S, N, K, H, h))


def _take_rows(x, p: _Prepared):
  """`x[b, rows[b, i]]` for `x: [B, S, ...]`: the outputs of the query rows."""
  if p.full_rows:
    return x
  idx = p.rows.reshape(p.rows.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _run_cumsum(x, p: _Prepared):
  """Inclusive cumulative sum along axis 1 that restarts at each packed run (segmented scan)."""
  if not p.segmented:
    return jnp.cumsum(x, axis=1)
  flags = jnp.broadcast_to(p.starts.reshape(p.starts.shape + (1,) * (x.ndim - 2)), x.shape)

  def combine(a, b):
    fa, xa = a
    fb, xb = b
    return fa | fb, jnp.where(fb, xb, xa + xb)

  return lax.associative_scan(combine, (flags, x), axis=1)[1]


def _run_total(x, p: _Prepared):
  """Sum of `x: [B, S, ...]` over each slot's whole run, at every slot of the run."""
  if not p.segmented:
    return jnp.broadcast_to(jnp.sum(x, axis=1, keepdims=True), x.shape)
  S = x.shape[1]
  slots = jnp.arange(S)
  ends = jnp.concatenate([p.starts[:, 1:], jnp.ones((p.starts.shape[0], 1), bool)], axis=1)
  end = lax.cummin(jnp.where(ends, slots[None, :], S - 1), axis=1, reverse=True)
  idx = end.reshape(end.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(_run_cumsum(x, p), idx, axis=1)


def _check_max_length(op: str, name: str, array, S: int):
  if S > array.shape[0]:
    raise ValueError(f"{op}: sequence length {S} exceeds the maximum length {array.shape[0]} of "
                     f"the position-indexed array `{name}` (its first dim); create it longer "
                     f"(default {DEFAULT_MAX_LENGTH} in attnjax.nn)")


def _check_param(op: str, name: str, x, expected: tuple, letters: str):
  checks.check_shape(op, name, x, expected, letters)
  return jnp.asarray(x, _F32)


def _self_only(op: str, causal: bool, *, allowed: tuple[bool, ...]):
  if causal not in allowed:
    kind = "causal" if causal else "non-causal"
    raise ValueError(f"mechanism {op!r} does not support {kind} self attention")


def _visible_prefix(p: _Prepared, row):
  """`[B, S]` slots that the query at cache slot `row: [B]` sees: its run, up to itself, valid."""
  slots = jnp.arange(p.valid.shape[1])
  run_start = jnp.take_along_axis(p.start, row[:, None], axis=1)
  return (slots[None] <= row[:, None]) & (slots[None] >= run_start) & p.valid


def _no_scale(op: str, scale):
  if scale is not None:
    raise ValueError(f"{op}: `scale` must be None: the mixer computes no query-key scores, so a "
                     f"logit scale has no meaning (got scale={scale!r})")


def _example(seed: int, shapes: dict[str, tuple[tuple[int, ...], float, float]]) -> dict[str, Any]:
  """Concrete arrays `mean + std · normal` at the conformance sizes (numpy: no device at import)."""
  rng = np.random.default_rng(seed)
  return {name: (mean + std * rng.standard_normal(shape)).astype(np.float32)
          for name, (shape, mean, std) in shapes.items()}


# Conformance sizes (tests/conformance): N = 4 query heads, h = 6; maximum length 32.
_EX_N, _EX_HV, _EX_L = 4, 6, 32

# --------------------------------------------------------------------------------------------------
# #122 FFTNet: adaptive spectral filtering.


def modrelu(re, im, bias):
  """modReLU on complex numbers given as (real, imag): `ReLU(|z| + b) · z / |z|`, 0 at z = 0.

  Arjovsky et al., "Unitary Evolution Recurrent Neural Networks", arXiv:1511.06464; FFTNet applies
  it to the filtered frequency coefficients. The division is guarded so that z = 0 (e.g. a fully
  padded input) gives 0 and a finite gradient.
  """
  r2 = re * re + im * im
  nonzero = r2 > 0
  mag = jnp.sqrt(jnp.where(nonzero, r2, 1.0))
  gain = jnp.where(nonzero, jax.nn.relu(mag + bias) / mag, 0.0)
  return re * gain, im * gain


def spectral_filter(x, filt, *, length: int, modrelu_bias=None, implementation: str = "xla"):
  """`irfft(σ(rfft(x, n=L) ⊙ W), n=L)`: global mixing along axis 1 by an L-point spectral filter.

  Args:
    x: `[B, S, N, h]` real, S <= L (zero-padded to L).
    filt: real filter `[B or 1, F, N, h]`, F = L/2 + 1 rfft bins of the even length L.
    length: L.
    modrelu_bias: `[N, h]` modReLU bias, or None for no activation (a linear filter).
    implementation: "xla" (jnp.fft, O(L log L)) or "reference" (explicit DFT sums, O(S·F + F·L)).

  Returns:
    `[B, L, N, h]` float32. With |W| = 1 and no activation the map is orthogonal up to the padding:
    ‖y‖² = ‖x‖² (Parseval), since a real unit-magnitude filter keeps the spectrum Hermitian.
  """
  F = length // 2 + 1
  x = x.astype(_F32)
  if implementation == "xla":
    spec = jnp.fft.rfft(x, n=length, axis=1)
    re, im = jnp.real(spec) * filt, jnp.imag(spec) * filt
  else:
    s = np.arange(x.shape[1])[:, None] * np.arange(F)[None, :] * (2 * np.pi / length)
    re = _einsum("bsnc,sf->bfnc", x, jnp.asarray(np.cos(s), _F32)) * filt
    im = -_einsum("bsnc,sf->bfnc", x, jnp.asarray(np.sin(s), _F32)) * filt
  if modrelu_bias is not None:
    re, im = modrelu(re, im, modrelu_bias)
  if implementation == "xla":
    return jnp.fft.irfft(lax.complex(re, im), n=length, axis=1)
  # irfft: y_n = (1/L) Σ_f c_f (Re Z_f cos(2π f n / L) - Im Z_f sin(2π f n / L)), with c_f = 2
  # except at f = 0 and f = L/2 (whose imaginary parts irfft ignores; sin vanishes there too).
  c = np.full(F, 2.0)
  c[0] = c[-1] = 1.0
  a = np.arange(F)[:, None] * np.arange(length)[None, :] * (2 * np.pi / length)
  cos = jnp.asarray(c[:, None] * np.cos(a) / length, _F32)
  sin = jnp.asarray(c[:, None] * np.sin(a) / length, _F32)
  return _einsum("bfnc,fl->blnc", re, cos) - _einsum("bfnc,fl->blnc", im, sin)


def fftnet_spectral_filter(q, k, v, *, fft_filter, fft_context_in, fft_context_in_bias,
                           fft_context_out, fft_modrelu_bias, activation: bool = True,
                           causal=False, segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                           implementation=None):
  """FFTNet: FFT the values along the sequence, multiply by a context-adapted filter, modReLU, iFFT.

      c = (1/T) Σ_j v_j                                   global context           [B, N, h]
      ΔW = GELU(c W_1 + b_1) W_2                          context MLP (erf GELU)   [B, F, N, h]
      y = irfft(modReLU(rfft(v, n=L) ⊙ (W + ΔW), b), n=L)[:T]

  per head, over the F = L/2 + 1 rfft bins of the filter's maximum length L (a shorter sequence is
  zero-padded to L, so the same learned filter serves every length); O(L log L), no [T, T] matrix.

  Paper: Fein-Ashley, "The FFT Strikes Back: An Efficient Alternative to Self-Attention",
  arXiv:2502.18394. The paper filters the layer input x and takes its context as the mean of that
  same x: one stream. Here that stream is each head's values v (`reads={"v"}`: q and k are not
  read, and the layer creates no projection for them); the context is the per-head mean of v (the
  authors' code feeds the mean of all of x to one MLP). rfft/irfft of the real signal with a real
  filter is the paper's FFT → filter → modReLU → iFFT → real part, with the spectrum Hermitian.

  Args:
    q: `[B, T, N, H]`, k: `[B, S, K, H]`: not read (shapes only). v: `[B, S, K, h]`; T == S
      (non-causal self-attention).
    fft_filter: base filter W, `[F, N, h]` (L = 2 (F - 1) is the maximum length).
    fft_context_in: `[N, h, M]`, fft_context_in_bias: `[N, M]`: first MLP layer on the context.
    fft_context_out: `[N, M, F, h]`: second MLP layer, giving ΔW.
    fft_modrelu_bias: `[N, h]` modReLU bias b.
    activation: apply modReLU (False: a linear, context-adapted filter).
    causal, segment_ids, q_offset: must be the defaults (non-causal, unpacked, no cache).
    kv_lengths: `[B]`: tokens at or past the length are padding (zeroed; left out of the context).
    scale: must be None (no scores). implementation: "xla" (jnp.fft) or "reference" (explicit
      DFT sums).

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "fftnet_spectral_filter"
  _self_only(op, causal, allowed=(False,))
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported: the spectral "
                     "filter mixes the whole padded sequence")
  p = _prepare(op, q, k, v, segment_ids=None, q_offset=q_offset, kv_lengths=kv_lengths,
               scale=scale, decode=False)
  _, T, S, N, _, _, h = p.dims
  if jnp.ndim(fft_filter) != 3 or fft_filter.shape[0] < 2:
    raise ValueError(f"{op}: `fft_filter` must have shape [F, N, h] with F >= 2 rfft bins, got "
                     f"{jnp.shape(fft_filter)}")
  F = fft_filter.shape[0]
  L = 2 * (F - 1)
  M = jnp.shape(fft_context_in)[-1]
  base = _check_param(op, "fft_filter", fft_filter, (F, N, h), "[F, N, h]")
  w1 = _check_param(op, "fft_context_in", fft_context_in, (N, h, M), "[N, h, M]")
  b1 = _check_param(op, "fft_context_in_bias", fft_context_in_bias, (N, M), "[N, M]")
  w2 = _check_param(op, "fft_context_out", fft_context_out, (N, M, F, h), "[N, M, F, h]")
  bias = _check_param(op, "fft_modrelu_bias", fft_modrelu_bias, (N, h), "[N, h]")
  if S > L:
    raise ValueError(f"{op}: sequence length {S} exceeds the maximum length L = 2 (F - 1) = {L} "
                     f"of `fft_filter` [F, N, h]; create it with more bins (default "
                     f"{DEFAULT_MAX_LENGTH} in attnjax.nn)")

  # Per example: the mean over that example's own valid tokens (padding is zero in p.v).
  count = jnp.sum(p.valid, axis=1).astype(_F32)[:, None, None]
  context = jnp.sum(p.v, axis=1) / jnp.maximum(count, 1.0)
  hidden = jax.nn.gelu(_einsum("bnc,ncm->bnm", context, w1) + b1, approximate=False)
  filt = base[None] + _einsum("bnm,nmfc->bfnc", hidden, w2)

  def run(impl):
    return lambda: spectral_filter(p.v, filt, length=L, modrelu_bias=bias if activation else None,
                                   implementation=impl)

  table = (("xla", run("xla"), ()), ("reference", run("reference"), ()))
  out = implementations.dispatch(op, table, implementation)
  return out[:, :T].astype(q.dtype)


register(Mechanism(
    name="fftnet_spectral_filter", fn=fftnet_spectral_filter, family="alternative-mixer",
    seeds=(122,), paper="The FFT Strikes Back: An Efficient Alternative to Self-Attention",
    arxiv="2502.18394", patterns=frozenset({"self"}), gqa=True, decode=False, packed=False,
    reads=frozenset({"v"}),  # the paper mixes one stream: filter and context both come from x
    complexity="O(L log L), L = maximum length >= T", implementations=("xla", "reference"),
    params=(
        ParamSpec("fft_filter", lambda n, kv, hd: (DEFAULT_MAX_LENGTH // 2 + 1, n, hd),
                  jax.nn.initializers.ones),
        ParamSpec("fft_context_in", lambda n, kv, hd: (n, hd, FFT_CONTEXT_HIDDEN),
                  jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1,
                                                       out_axis=2, batch_axis=0)),
        ParamSpec("fft_context_in_bias", lambda n, kv, hd: (n, FFT_CONTEXT_HIDDEN),
                  jax.nn.initializers.zeros),
        # Zero: the filter starts as the base filter, and the MLP learns how context adapts it.
        ParamSpec("fft_context_out",
                  lambda n, kv, hd: (n, FFT_CONTEXT_HIDDEN, DEFAULT_MAX_LENGTH // 2 + 1, hd),
                  jax.nn.initializers.zeros),
        ParamSpec("fft_modrelu_bias", lambda n, kv, hd: (n, hd), jax.nn.initializers.zeros),
    ),
    example=_example(122, {
        "fft_filter": ((_EX_L // 2 + 1, _EX_N, _EX_HV), 1.0, 0.3),
        "fft_context_in": ((_EX_N, _EX_HV, 8), 0.0, 0.3),
        "fft_context_in_bias": ((_EX_N, 8), 0.0, 0.1),
        "fft_context_out": ((_EX_N, 8, _EX_L // 2 + 1, _EX_HV), 0.0, 0.1),
        "fft_modrelu_bias": ((_EX_N, _EX_HV), -0.2, 0.1),
    })))

# --------------------------------------------------------------------------------------------------
# #134 Causal pairwise mixer.


def causal_pairwise_mixer(q, k, v, *, pairwise_current, pairwise_previous, pairwise_context,
                          pairwise_bias, use_context: bool = True, causal=True, segment_ids=None,
                          q_offset=0, kv_lengths=None, scale=None, implementation=None,
                          initial_state=None, return_final_state=False):
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
  _self_only(op, causal, allowed=(True,))
  _no_scale(op, scale)
  if return_final_state:
    return _pairwise_recurrent(op, q, k, v, initial_state, pairwise_current, pairwise_previous,
                               pairwise_context, pairwise_bias, use_context,
                               segment_ids=segment_ids, kv_lengths=kv_lengths)
  if initial_state is not None:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  p = _prepare(op, q, k, v, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
               scale=scale, decode=True)
  _, _, _, N, _, _, h = p.dims
  mats = [_check_param(op, name, x, (N, h, h), "[N, h, h]") for name, x in (
      ("pairwise_current", pairwise_current), ("pairwise_previous", pairwise_previous),
      ("pairwise_context", pairwise_context))]
  bias = _check_param(op, "pairwise_bias", pairwise_bias, (N, h), "[N, h]")
  table = (("xla", _pairwise_xla, ()), ("reference", _pairwise_reference, ()))
  out = implementations.dispatch(op, table, implementation, p, *mats, bias, use_context)
  return out.astype(q.dtype)


def _pairwise_out(cur, prev, mean, count, a, b, c, bias, use_context):
  pre = _einsum("bnc,ncd->bnd", cur, a) + _einsum("bnc,ncd->bnd", prev, b) + bias
  if use_context:
    pre = pre + _einsum("bnc,ncd->bnd", mean, c)
  return jnp.where(count[:, None, None] > 0, jax.nn.gelu(pre), 0.0)


def _pairwise_xla(p: _Prepared, a, b, c, bias, use_context):
  prev = jnp.concatenate([jnp.zeros_like(p.v[:, :1]), p.v[:, :-1]], axis=1)
  prev = jnp.where((p.pos >= 1)[:, :, None, None], prev, 0.0)
  count = _run_cumsum(p.valid.astype(_F32), p)
  mean = _run_cumsum(p.v, p) / jnp.maximum(count, 1.0)[:, :, None, None]
  cur, prev, mean, count = (_take_rows(x, p) for x in (p.v, prev, mean, count))
  fold = lambda x: x.reshape((-1,) + x.shape[2:])
  out = _pairwise_out(fold(cur), fold(prev), fold(mean), fold(count), a, b, c, bias, use_context)
  return out.reshape(cur.shape)


def _pairwise_recurrent(op, q, k, v, state, a, b, c, bias, use_context, *, segment_ids,
                        kv_lengths):
  """The mixer over T new tokens from the carried (previous value, running sum, count)."""
  B, T, S, N, K, _, h = checks.check_qkv(op, q, k, v)
  if T != S or segment_ids is not None or kv_lengths is not None:
    raise ValueError(f"{op}: recurrent decoding takes the new tokens only (T == S, got T={T}, "
                     f"S={S}) and no `segment_ids` or `kv_lengths`")
  mats = [_check_param(op, name, x, (N, h, h), "[N, h, h]") for name, x in (
      ("pairwise_current", a), ("pairwise_previous", b), ("pairwise_context", c))]
  bias = _check_param(op, "pairwise_bias", bias, (N, h), "[N, h]")
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


def _pairwise_reference(p: _Prepared, a, b, c, bias, use_context):
  """Explicit loop over query rows: token, predecessor and visible mean read from the cache."""

  def one_row(row):
    vis = _visible_prefix(p, row)
    count = jnp.sum(vis, axis=1).astype(_F32)
    mean = jnp.sum(jnp.where(vis[:, :, None, None], p.v, 0.0), axis=1) / jnp.maximum(
        count, 1.0)[:, None, None]
    cur = jnp.take_along_axis(p.v, row[:, None, None, None], axis=1)[:, 0]
    has_prev = jnp.take_along_axis(p.pos, row[:, None], axis=1)[:, 0] >= 1
    prev = jnp.take_along_axis(p.v, jnp.maximum(row - 1, 0)[:, None, None, None], axis=1)[:, 0]
    prev = jnp.where(has_prev[:, None, None], prev, 0.0)
    return _pairwise_out(cur, prev, mean, count, a, b, c, bias, use_context)

  return jnp.moveaxis(lax.map(one_row, p.rows.T), 0, 1)


_square = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2,
                                               batch_axis=0)
register(Mechanism(
    name="causal_pairwise_mixer", fn=causal_pairwise_mixer, family="alternative-mixer",
    seeds=(134,), paper="Breaking the Attention Bottleneck", arxiv="2406.10906",
    patterns=frozenset({"causal_self"}), gqa=True, decode=True, recurrent=True, packed=True,
    reads=frozenset({"v"}),  # the paper mixes one stream: each token and its predecessor
    complexity="O(T)",
    implementations=("xla", "reference"),
    params=(
        ParamSpec("pairwise_current", lambda n, kv, hd: (n, hd, hd), _square),
        ParamSpec("pairwise_previous", lambda n, kv, hd: (n, hd, hd), _square),
        ParamSpec("pairwise_context", lambda n, kv, hd: (n, hd, hd), _square),
        ParamSpec("pairwise_bias", lambda n, kv, hd: (n, hd), jax.nn.initializers.zeros),
    ),
    example=_example(134, {
        "pairwise_current": ((_EX_N, _EX_HV, _EX_HV), 0.0, 0.4),
        "pairwise_previous": ((_EX_N, _EX_HV, _EX_HV), 0.0, 0.4),
        "pairwise_context": ((_EX_N, _EX_HV, _EX_HV), 0.0, 0.4),
        "pairwise_bias": ((_EX_N, _EX_HV), 0.0, 0.1),
    }),
    # Decoding needs the previous token's value and the running sum and count of the values.
    state_size=lambda T, N, K, H, h, kw: 2 * K * h + 1))

# --------------------------------------------------------------------------------------------------
# #80 Shallow FFN replacing attention.


def ffn_attention_replacement(q, k, v, *, ffn_in, ffn_in_bias, ffn_out, ffn_out_bias, causal=False,
                              segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                              implementation=None):
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
  p = _prepare(op, q, k, v, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
               scale=scale, decode=causal)
  _, _, S, N, _, _, h = p.dims
  if jnp.ndim(ffn_in) != 4:
    raise ValueError(f"{op}: `ffn_in` must have shape [L, N, h, M], got {jnp.shape(ffn_in)}")
  L, M = ffn_in.shape[0], ffn_in.shape[3]
  w1 = _check_param(op, "ffn_in", ffn_in, (L, N, h, M), "[L, N, h, M]")
  b1 = _check_param(op, "ffn_in_bias", ffn_in_bias, (N, M), "[N, M]")
  w2 = _check_param(op, "ffn_out", ffn_out, (L, N, M, h), "[L, N, M, h]")
  b2 = _check_param(op, "ffn_out_bias", ffn_out_bias, (L, N, h), "[L, N, h]")
  _check_max_length(op, "ffn_in", w1, S)
  table = (("xla", _ffn_xla, ()), ("reference", _ffn_reference, ()))
  out = implementations.dispatch(op, table, implementation, p, w1, b1, w2, b2, causal)
  return out.astype(q.dtype)


def _ffn_xla(p: _Prepared, w1, b1, w2, b2, causal):
  S = p.v.shape[1]
  if p.segmented:
    contrib = _einsum("bsnc,bsncm->bsnm", p.v, w1[p.pos])
  else:
    contrib = _einsum("bsnc,sncm->bsnm", p.v, w1[:S])
  count = p.valid.astype(_F32)
  if causal:
    hidden, count = _run_cumsum(contrib, p), _run_cumsum(count, p)
  else:
    hidden, count = _run_total(contrib, p), _run_total(count, p)
  hidden = jax.nn.relu(_take_rows(hidden, p) + b1)
  count = _take_rows(count, p)
  if p.full_rows and not p.segmented:
    out = _einsum("btnm,tnmc->btnc", hidden, w2[:S]) + b2[:S]
  else:
    row_pos = jnp.take_along_axis(p.pos, p.rows, axis=1)
    out = _einsum("btnm,btnmc->btnc", hidden, w2[row_pos]) + b2[row_pos]
  return jnp.where(count[:, :, None, None] > 0, out, 0.0)


def _ffn_reference(p: _Prepared, w1, b1, w2, b2, causal):
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
    hidden = jax.nn.relu(_einsum("bnf,nfm->bnm", flat, w1_flat) + b1)
    row_pos = row - run_start[:, 0]
    out = _einsum("bnm,bnmc->bnc", hidden, w2[row_pos]) + b2[row_pos]
    return jnp.where(jnp.any(vis, axis=1)[:, None, None], out, 0.0)

  return jnp.moveaxis(lax.map(one_row, p.rows.T), 0, 1)


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
    params=(
        ParamSpec("ffn_in", lambda n, kv, hd: (DEFAULT_MAX_LENGTH, n, hd, FFN_HIDDEN),
                  jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 2),
                                                       out_axis=3, batch_axis=1)),
        ParamSpec("ffn_in_bias", lambda n, kv, hd: (n, FFN_HIDDEN), jax.nn.initializers.zeros),
        ParamSpec("ffn_out", lambda n, kv, hd: (DEFAULT_MAX_LENGTH, n, FFN_HIDDEN, hd),
                  jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=2,
                                                       out_axis=(0, 3), batch_axis=1)),
        ParamSpec("ffn_out_bias", lambda n, kv, hd: (DEFAULT_MAX_LENGTH, n, hd),
                  jax.nn.initializers.zeros),
    ),
    example=_example(80, {
        "ffn_in": ((_EX_L, _EX_N, _EX_HV, 16), 0.0, 0.15),
        "ffn_in_bias": ((_EX_N, 16), 0.1, 0.1),
        "ffn_out": ((_EX_L, _EX_N, 16, _EX_HV), 0.0, 0.3),
        "ffn_out_bias": ((_EX_L, _EX_N, _EX_HV), 0.0, 0.1),
    })))
