"""The three causal forms of gated linear attention, on head-major float32 inputs.

    S_t = G_t ⊙ S_{t-1} + k_t v_tᵀ,   o_t = q_t S_t            (see `attnjax.core.linear`)

Each form takes q, k `[B,N,T,F]`, v `[B,N,T,hv]`, g (log decay) `[B,N,T,1 or F]` or None, run `[B,T]`
(non-decreasing document runs; the state resets where it changes) or None, state0 `[B,N,F,hv]` or None,
and returns `(o [B,N,T,hv], S_T [B,N,F,hv])`. They are equal up to float rounding and are tested
against each other (tests/core/linear_test.py), as flash-linear-attention tests its naive, chunk and
recurrent forms:

  recurrent  a `lax.scan` over steps: the definition.
  parallel   `o = ((Q Kᵀ) ⊙ D) V` with `D_ts = exp(Λ_t - Λ_s)` for s ≤ t: quadratic in T.
  chunked    Lightning Attention-2 tiling: the quadratic form within chunks of C steps, the state
             recurrence across chunks as an associative scan; memory linear in T. With one gate per
             key channel (GLA) the intra-chunk weights are never `[C, C, F]`: one matmul of queries
             and keys rescaled by e^{±Λ} (`_factored_intra`) when every chunk's decay is within
             `FACTORED_RANGE`, else matmuls rescaled at block boundaries (`_halving_intra`, exponents
             ≤ 0, exact at any decay strength).

Papers: Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training",
arXiv:2312.06635; Qin et al., "Lightning Attention-2", arXiv:2401.04658.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnjax.core import implementations

__all__ = ["chunked", "masked_scores", "parallel", "recurrent"]

_F32 = jnp.float32


def _neutral_gate(q, g):
  return jnp.zeros(q.shape[:3] + (1,), _F32) if g is None else g


def recurrent(q, k, v, g, run, state0):
  """The recurrence step by step (`lax.scan`): the reference form."""
  B, N, T, F = q.shape
  hv = v.shape[-1]
  g = _neutral_gate(q, g)
  S0 = jnp.zeros((B, N, F, hv), _F32) if state0 is None else state0
  reset = (jnp.zeros((B, T), bool) if run is None else
           jnp.concatenate([jnp.zeros((B, 1), bool), run[:, 1:] != run[:, :-1]], 1))

  def step(S, x):
    q_t, k_t, v_t, g_t, reset_t = x
    S = jnp.where(reset_t[:, None, None, None], 0.0, jnp.exp(g_t)[..., None] * S)
    S = S + k_t[..., :, None] * v_t[..., None, :]
    return S, jnp.einsum("bnf,bnfh->bnh", q_t, S)

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, g)) + (reset.T,)
  S, o = jax.lax.scan(step, S0, xs)
  return jnp.moveaxis(o, 0, 2), S


def _decay_weights(L_q, L_k, visible):
  """exp(L_q[t] - L_k[s]) where visible (exponent ≤ 0 there), 0 elsewhere.

  L_q: [.., T, G], L_k: [.., S, G] -> [.., T, S, G]. The exponent is masked before exp so hidden
  pairs (whose exponent may be large and positive) never overflow, in the forward or the gradient.
  """
  diff = L_q[..., :, None, :] - L_k[..., None, :, :]
  return jnp.exp(jnp.where(visible[..., None], diff, -jnp.inf))


def masked_scores(q, k, L_q, L_k, visible):
  """Σ_f q_tf k_sf exp(L_q[t,f] - L_k[s,f]) over visible (t, s) pairs: [.., T, S]."""
  if L_q.shape[-1] == 1:   # one gate per head: the decay factors out of the dot product
    scores = jnp.einsum("...tf,...sf->...ts", q, k)
    return jnp.where(visible, scores, 0.0) * _decay_weights(L_q, L_k, visible)[..., 0]
  return jnp.einsum("...tf,...sf,...tsf->...ts", q, k, _decay_weights(L_q, L_k, visible))


def _halving_intra(q, k, v, L, run, C):
  """Intra-chunk term `Σ_{s ≤ t} (Σ_f q_tf k_sf e^{L_tf - L_sf}) v_s` for a per-channel decay.

  q, k `[B,N,T,F]`, v `[B,N,T,hv]`, L `[B,N,T,F]` (cumulative log decay, non-increasing within each
  chunk of C = 2^m steps; T a multiple of C), run `[B,T]` or None. Each block of b steps (b = 2, 4,
  ..., C) is halved; the pairs (t in the second half, s in the first) go through a plain matmul with
  the decay factored at the boundary β = L at the first half's last step:

      e^{L_t - L_s} = e^{L_t - β} · e^{β - L_s},    both exponents ≤ 0 (L_t ≤ β ≤ L_s),

  so nothing overflows however strong the decay (a factor that underflows belongs to a weight that
  does too). The pairs within each half are the level below's; s = t is the diagonal `q_t · k_t`.
  The levels' blocks are assembled into the chunk's `[C, C]` weights, applied to v in one matmul: one
  `exp` per step and level, no `[C, C, F]` weights (GLA's secondary-level chunking, arXiv:2312.06635
  §4, taken down to single steps).
  """
  B, N, T, _ = q.shape
  # s = t. An einsum, not sum(q * k, -1): XLA:CPU runs that minor-axis reduce ~50x slower.
  A = jnp.einsum("bntf,bntf->bnt", q, k)[..., None, None]                  # [B,N,T,1,1]
  b = 1
  while b < C:
    b *= 2
    half = b // 2
    split = lambda x: x.reshape(x.shape[:2] + (T // b, 2, half) + x.shape[3:])
    qb, kb, Lb = split(q), split(k), split(L)
    beta = Lb[:, :, :, 0, half - 1:, :]                               # [B,N,T/b,1,F]
    qt = qb[:, :, :, 1] * jnp.exp(Lb[:, :, :, 1] - beta)
    ks = kb[:, :, :, 0] * jnp.exp(beta - Lb[:, :, :, 0])
    cross = jnp.einsum("bnmtf,bnmsf->bnmts", qt, ks)
    if run is not None:
      rb = run.reshape(B, T // b, 2, half)
      cross = jnp.where((rb[:, :, 1, :, None] == rb[:, :, 0, None, :])[:, None], cross, 0.0)
    A = A.reshape(B, N, T // b, 2, half, half)
    A = jnp.concatenate([jnp.concatenate([A[:, :, :, 0], jnp.zeros_like(cross)], axis=-1),
                         jnp.concatenate([cross, A[:, :, :, 1]], axis=-1)], axis=-2)
  return jnp.einsum("bncts,bncsh->bncth", A, v.reshape(B, N, T // C, C, v.shape[-1]))


# Largest total log decay of a chunk (-Λ at its last step, per channel) for which `_factored_intra` is
# used: its rescaled keys grow up to e^40 ≈ 2e17 and its queries shrink to e^-40 ≈ 4e-18, both normal
# float32 numbers far from overflow and underflow (products of a query and a key are ≤ 1 on visible
# pairs; hidden pairs, up to e^40 |q||k|, are masked by `where` after the matmul).
FACTORED_RANGE = 40.0


def _chunked_view(x, C):
  """`[B,N,T,...]` -> `[B,N,T/C,C,...]`."""
  return x.reshape(x.shape[:2] + (x.shape[2] // C, C) + x.shape[3:])


def _factored_visible(run, B, T, C):
  """Causal pairs within each chunk, same run only: `[C,C]` or `[B,1,nc,C,C]`."""
  visible = jnp.tril(jnp.ones((C, C), bool))
  if run is None:
    return visible
  runc = run.reshape(B, T // C, C)
  return (visible & (runc[..., :, None] == runc[..., None, :]))[:, None]


def _factored_intra(q, k, v, L, run, C):
  """Intra-chunk term for a per-channel decay of bounded range, as one masked matmul per chunk:

      Σ_f q_tf k_sf e^{Λ_tf - Λ_sf} = Σ_f (q_tf e^{Λ_tf}) (k_sf e^{-Λ_sf}) = q̃_t · k̃_s,

  Λ the cumulative log decay from the chunk's start (0 ≥ Λ ≥ -FACTORED_RANGE, so both factors are
  finite). Arguments and result `[B,N,T/C,C,hv]` as `_halving_intra`'s; also returns q̃, k̃, e^Λ
  and the masked scores (the backward's residuals)."""
  B, _, T, _ = q.shape
  decay = jnp.exp(L)
  qs, ks = q * decay, k / decay
  scores = jnp.einsum("bnctf,bncsf->bncts", _chunked_view(qs, C), _chunked_view(ks, C))
  scores = jnp.where(_factored_visible(run, B, T, C), scores, 0.0)
  o = jnp.einsum("bncts,bncsh->bncth", scores, _chunked_view(v, C))
  return o, (qs, ks, decay, scores)


def _factored_intra_bwd(saved, v, run, C, ct):
  """(dq, dk, dv, dΛ) of `_factored_intra` from its residuals and the output cotangent `ct`."""
  qs, ks, decay, scores = saved
  B, N, T, F = qs.shape
  visible = _factored_visible(run, B, T, C)
  qc, kc, vc = _chunked_view(qs, C), _chunked_view(ks, C), _chunked_view(v, C)
  dv = jnp.einsum("bncts,bncth->bncsh", scores, ct)
  dscores = jnp.where(visible, jnp.einsum("bncth,bncsh->bncts", ct, vc), 0.0)
  dqs = jnp.einsum("bncts,bncsf->bnctf", dscores, kc).reshape(qs.shape)
  dks = jnp.einsum("bncts,bnctf->bncsf", dscores, qc).reshape(ks.shape)
  # q̃ = q e^Λ and k̃ = k e^-Λ: dq = dq̃ e^Λ, dk = dk̃ e^-Λ, dΛ = dq̃ q̃ - dk̃ k̃.
  return dqs * decay, dks / decay, dv.reshape(v.shape), dqs * qs - dks * ks


def _factored_fits(L, C):
  """Whether every chunk's total decay is within FACTORED_RANGE (L: `[B,N,T,F]`, chunk-local)."""
  return jnp.max(-_chunked_view(L, C)[:, :, :, -1]) <= FACTORED_RANGE


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _per_channel_intra(q, k, v, L, run, C):
  """The intra-chunk term for a per-channel decay: factored (`_factored_intra`) when every chunk's
  decay is within FACTORED_RANGE (GLA's gates: a few units over 64 steps), else block halving
  (`_halving_intra`, exact at any strength), chosen at run time. The factored form always runs (a
  fused pass of the common case; out of its range its values are discarded by a select, never
  multiplied); halving runs under a `lax.cond` only when needed. A custom VJP does the same in the
  backward: autodiff of `lax.cond` would keep the residuals of both forms."""
  return _per_channel_intra_fwd(q, k, v, L, run, C)[0]


def _per_channel_intra_fwd(q, k, v, L, run, C):
  fits = _factored_fits(L, C)
  o, saved = _factored_intra(q, k, v, L, run, C)
  strong = jax.lax.cond(fits, lambda: jnp.zeros_like(o), lambda: _halving_intra(q, k, v, L, run, C))
  return jnp.where(fits, o, strong), (q, k, v, L, run, saved)


def _per_channel_intra_bwd(C, res, ct):
  q, k, v, L, run, saved = res
  fits = _factored_fits(L, C)
  factored = _factored_intra_bwd(saved, v, run, C, ct)
  strong = jax.lax.cond(fits, lambda: tuple(map(jnp.zeros_like, (q, k, v, L))),
                        lambda: jax.vjp(lambda *a: _halving_intra(*a, run, C), q, k, v, L)[1](ct))
  return tuple(jnp.where(fits, a, b) for a, b in zip(factored, strong, strict=True)) + (None,)


_per_channel_intra.defvjp(_per_channel_intra_fwd, _per_channel_intra_bwd)


def parallel(q, k, v, g, run, state0):
  """The masked quadratic form with cumulative log decays Λ; the final state from the last run."""
  B, N, T, F = q.shape
  L = jnp.cumsum(_neutral_gate(q, g), axis=2)                                    # Λ_t = Σ_{r≤t} log G_r
  visible = jnp.tril(jnp.ones((T, T), bool))[None]
  if run is not None:
    visible = visible & (run[:, :, None] == run[:, None, :])
  scores = masked_scores(q, k, L, L, visible[:, None])
  o = jnp.einsum("bnts,bnsh->bnth", scores, v)
  last_run = None if run is None else run[:, -1:]
  keep_last = jnp.ones((B, T), bool) if run is None else run == last_run
  S = jnp.einsum("bnsf,bnsh->bnfh", k * jnp.exp(jnp.where(keep_last[:, None, :, None],
                                                          L[:, :, -1:] - L, -jnp.inf)), v)
  if state0 is not None:
    first = jnp.ones((B, T), bool) if run is None else run == run[:, :1]
    o = o + jnp.einsum("bntf,bnfh->bnth",
                       q * jnp.exp(L) * first[:, None, :, None], state0)
    S = S + jnp.exp(L[:, :, -1])[..., None] * state0 * first[:, -1][:, None, None, None]
  return o, S


def _scan_chunk_states(A, U, run_break):
  """Prefix of `S_c = A_c ⊙ S_{c-1} + U_c` over chunks (axis 2), from S_{-1} = 0.

  A: [B,N,nc,G,1] (G = 1 or F), U: [B,N,nc,F,hv]. Returns (states after each chunk, cumulative A).
  """
  if A is None and not run_break:
    return jnp.cumsum(U, axis=2), None

  def combine(earlier, later):
    a1, u1 = earlier
    a2, u2 = later
    return a1 * a2, a2 * u1 + u2

  Acum, states = jax.lax.associative_scan(combine, (A, U), axis=2)
  return states, Acum


def chunked(q, k, v, g, run, state0, *, chunk_size):
  """Quadratic within chunks of `chunk_size` steps, state recurrence across them."""
  B, N, T, F = q.shape
  hv = v.shape[-1]
  C = min(chunk_size, T)
  per_channel = g is not None and g.shape[-1] > 1
  if per_channel:   # `_halving_intra` halves blocks down to single steps: C = 2^m (≤ chunk_size)
    C = 1 << (C.bit_length() - 1)
  nc = -(-T // C)
  pad = nc * C - T
  if pad:
    # Padded steps: zero keys and values, neutral gate, same run as the last step -> state unchanged.
    pad4 = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q, k, v = pad4(q), pad4(k), pad4(v)
    g = None if g is None else pad4(g)
    run = None if run is None else jnp.pad(run, ((0, 0), (0, pad)), mode="edge")
  chunks = lambda x: x.reshape(x.shape[:2] + (nc, C) + x.shape[3:])
  qc, kc, vc = chunks(q), chunks(k), chunks(v)
  if g is None:
    L = jnp.zeros((B, N, nc, C, 1), _F32)
  elif per_channel:
    # The cumulative sum as a batched matmul, whose output XLA:CPU materializes in this layout: a
    # cumsum (reduce-window) would be fused, with a transpose, into each of the many consumers below.
    tril = jnp.broadcast_to(jnp.tril(jnp.ones((C, C), _F32)), (B * N * nc, C, C))
    L = jnp.einsum("mts,msf->mtf", tril, g.reshape(B * N * nc, C, F),
                   precision=jax.lax.Precision.HIGHEST).reshape(B, N, nc, C, F)
  else:
    L = jnp.cumsum(chunks(g), axis=3)
  runc = None if run is None else run.reshape(B, nc, C)
  # run of the step before each chunk (the run the carried state belongs to)
  prev_run = None if run is None else jnp.concatenate([run[:, :1], runc[:, :-1, -1]], 1)

  # Intra-chunk: causal quadratic form with local cumulative decays (all exponents ≤ 0).
  if per_channel:
    L_flat = L.reshape(q.shape)
    if implementations.under_forward_mode(q, k, v, L_flat):
      # Forward-mode autodiff (jax.jvp) cannot enter a custom VJP: the plain halving form then.
      o = _halving_intra(q, k, v, L_flat, run, C)
    else:
      o = _per_channel_intra(q, k, v, L_flat, run, C)
    o = o.reshape(vc.shape)
  else:
    visible = jnp.tril(jnp.ones((C, C), bool))
    if runc is not None:
      visible = visible & (runc[..., :, None] == runc[..., None, :])   # [B, nc, C, C]
      visible = visible[:, None]
    if g is None:
      # where, not multiply: a hidden (future) key may hold inf, and inf * 0 is NaN.
      scores = jnp.where(visible, jnp.einsum("bnctf,bncsf->bncts", qc, kc), 0.0)
    else:
      scores = masked_scores(qc, kc, L, L, visible)
    o = jnp.einsum("bncts,bncsh->bncth", scores, vc)

  # Chunk summaries: U_c = Σ_s exp(L_end - L_s) k_s v_sᵀ over the chunk's last run; A_c the decay.
  L_end = L[:, :, :, -1:, :]                                          # [B,N,nc,1,G]
  if g is None and runc is None:
    kd = kc
  else:
    keep = jnp.ones((B, nc, C), bool) if runc is None else runc == runc[..., -1:]
    kd = kc * jnp.exp(jnp.where(keep[:, None, ..., None], L_end - L, -jnp.inf))
  U = jnp.einsum("bncsf,bncsh->bncfh", kd, vc)
  A = None
  if g is not None or runc is not None:
    A = jnp.exp(L_end[:, :, :, 0, :])[..., None]                      # [B,N,nc,G,1]
    if runc is not None:
      A = A * (runc[:, :, -1] == prev_run)[:, None, :, None, None]
  after, Acum = _scan_chunk_states(A, U, runc is not None)
  if state0 is not None:
    after = after + (1.0 if Acum is None else Acum) * state0[:, :, None]
  before = jnp.concatenate([jnp.zeros_like(after[:, :, :1]) if state0 is None else
                            state0[:, :, None], after[:, :, :-1]], axis=2)

  # Inter-chunk: each query reads the state carried into its chunk, decayed to its step.
  qd = qc if g is None else qc * jnp.exp(L)
  if runc is not None:
    qd = qd * (runc == prev_run[..., None])[:, None, ..., None]
  o = o + jnp.einsum("bnctf,bncfh->bncth", qd, before)
  o = o.reshape(B, N, nc * C, hv)[:, :, :T]
  return o, after[:, :, -1]
