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
             recurrence across chunks as an associative scan; memory linear in T.

Papers: Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training",
arXiv:2312.06635; Qin et al., "Lightning Attention-2", arXiv:2401.04658.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
  if g is not None and g.shape[-1] > 1:
    # A per-dimension gate makes intra-chunk weights [C, C, F]: keep chunks small so that tensor
    # stays ~T·16·F, the size of the inputs times 16.
    C = min(C, 16)
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
  L = jnp.zeros((B, N, nc, C, 1), _F32) if g is None else jnp.cumsum(chunks(g), axis=3)
  runc = None if run is None else run.reshape(B, nc, C)
  # run of the step before each chunk (the run the carried state belongs to)
  prev_run = None if run is None else jnp.concatenate([run[:, :1], runc[:, :-1, -1]], 1)

  # Intra-chunk: causal quadratic form with local cumulative decays (all exponents ≤ 0).
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
