"""Backward kernel of `gla_triton`: a reverse walk over chunks carrying dS (formulas in gla_triton's
docstring), reading the chunk states the forward pass stored."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from attnjax.kernels import platform
from attnjax.kernels.gla_triton import (Chunk, Config, channel_scan, chunk_info, decayed, iota,
                                        scalar_weights, side_specs, split_refs, times)

_F32 = jnp.float32


def intra_grads(cfg: Config, q, k, dA, ch: Chunk, k_ref, lam_ref, run_ref, base):
  """(A, dq, dk) of the intra-chunk part, given dA_ts = dO_t · v_s."""
  if cfg.gate != "channel":
    D = scalar_weights(cfg, ch)
    dAD = dA * D
    return cfg.mm(q, k, (1, 1)) * D, cfg.mm(dAD, k), cfg.mm(dAD, q, (0, 0))
  C = cfg.C
  t = iota(C)

  def column(s, w, k_s, carry):
    A, dq, dk = carry
    on_s = t[None, :] == s
    a = jnp.sum(q * k_s[None, :] * w, axis=1)                      # A[:, s]
    da = jnp.sum(jnp.where(on_s, dA, 0.0), axis=1)                  # dA[:, s]
    dq = dq + da[:, None] * k_s[None, :] * w
    dk_s = jnp.sum(da[:, None] * q * w, axis=0)                      # row s of dk
    return (jnp.where(on_s, a[:, None], A), dq, jnp.where((t == s)[:, None], dk_s[None, :], dk))

  init = (jnp.zeros((C, C), _F32), jnp.zeros(q.shape, _F32), jnp.zeros(q.shape, _F32))
  return channel_scan(cfg, q, k_ref, run_ref, ch, lam_ref, base, column, init)


def _backward_kernel(*refs, cfg: Config):
  (q_ref, k_ref, v_ref), lam_ref, run_ref, rest = split_refs(cfg, refs, 3)
  states_ref, do_ref, dsT_ref, dq_ref, dk_ref, dv_ref, ds0_ref = rest[:7]
  ends_ref = rest[7] if cfg.gate != "none" else None
  C, Fp = cfg.C, q_ref.shape[-1]

  def body(i, dS):                     # dS: cotangent of the state after chunk c
    c = cfg.nc - 1 - i
    base = pl.multiple_of(c * C, C)
    rows = pl.ds(base, C)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    S = states_ref[pl.ds(pl.multiple_of(c * Fp, Fp), Fp), :]
    ch = chunk_info(cfg, lam_ref, run_ref, base)
    # dA needs no mask: the weights A is built from are 0 wherever s is hidden from t.
    A, dq, dk = intra_grads(cfg, q, k, cfg.mm(do, v, (1, 1)), ch, k_ref, lam_ref, run_ref, base)
    qd, kd = decayed(q, k, ch)
    dq = dq + times(ch.q_factor, cfg.mm(do, S, (1, 1)))           # e^{Λ_t} ⊙ (S dO_t), as [C, Fp]
    dk = dk + times(ch.k_factor, cfg.mm(v, dS, (1, 1)))           # e^{Λ_C - Λ_s} ⊙ (dS v_s)
    if ends_ref is not None:
      # d/dΛ_C of S' = e^{Λ_C} ⊙ S + Σ_s (k_s ⊙ e^{Λ_C - Λ_s}) v_sᵀ is S' itself: Σ_j S'_·j dS_·j.
      S_next = states_ref[pl.ds(pl.multiple_of((c + 1) * Fp, Fp), Fp), :]
      ends_ref[c, :] = jnp.sum(S_next * dS, axis=1)
    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = cfg.mm(A, do, (0, 0)) + cfg.mm(kd, dS)
    return times(ch.s_factor, dS) + cfg.mm(qd, do, (0, 0))

  ds0_ref[...] = jax.lax.fori_loop(0, cfg.nc, body, dsT_ref[...])


def _kernel(cfg: Config, *ins, interpret):
  q, v = ins[0], ins[2]
  BN, Tp, Fp = q.shape
  hvp, bv = v.shape[-1], cfg.bv
  nv = hvp // bv
  seq = pl.BlockSpec((None, Tp, Fp), lambda i, j: (i, 0, 0))
  seq_v = pl.BlockSpec((None, Tp, bv), lambda i, j: (i, 0, j))
  state = lambda rows: pl.BlockSpec((None, rows, bv), lambda i, j: (i, 0, j))
  # dq, dk sum over value columns: one partial per value tile, summed outside.
  partial = lambda rows: pl.BlockSpec((None, None, rows, Fp), lambda i, j: (j, i, 0, 0))
  out_specs = [partial(Tp), partial(Tp), seq_v, state(Fp)]
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, _F32)
  out_shape = [shape(nv, BN, Tp, Fp), shape(nv, BN, Tp, Fp), shape(BN, Tp, hvp), shape(BN, Fp, hvp)]
  if cfg.gate != "none":
    out_specs.append(partial(cfg.nc))
    out_shape.append(shape(nv, BN, cfg.nc, Fp))
  cfg = dataclasses.replace(cfg, compiled=not interpret)
  return pl.pallas_call(
      functools.partial(_backward_kernel, cfg=cfg), grid=(BN, nv),
      in_specs=[seq, seq, seq_v, *side_specs(cfg, Tp, Fp), state((cfg.nc + 1) * Fp), seq_v, state(Fp)],
      out_specs=out_specs, out_shape=out_shape, compiler_params=cfg.params(), interpret=interpret,
      name="gla_triton_bwd")(*ins)


def backward(cfg: Config, q, k, v, lam, run, states, do, dsT):
  """Cotangents `(dq, dk, dv, dΛ, d runs, d state0)` of `gla_triton._gla`'s padded inputs (None for the
  runs and for an absent gate or initial state)."""
  ins = [x for x in (q, k, v, lam, run) if x is not None] + [states, do.astype(_F32),
                                                              dsT.astype(_F32)]
  dq, dk, dv, ds0, *ends = platform.on_platform(functools.partial(_kernel, cfg), *ins)
  dq, dk = jnp.sum(dq, axis=0), jnp.sum(dk, axis=0)
  dlam = None
  if lam is not None:
    # Λ enters as q_t e^{Λ_t} and k_s e^{-Λ_s} (and e^{Λ_C} in the state update).
    BN, Tp, Fp = q.shape
    dlam = (q * dq - k * dk).reshape(BN, cfg.nc, cfg.C, Fp)
    dlam = dlam.at[:, :, -1].add(jnp.sum(ends[0], axis=0)).reshape(BN, Tp, Fp)
    dlam = jnp.sum(dlam, axis=-1) if cfg.gate == "scalar" else dlam
  return dq, dk, dv, dlam, None, ds0 if cfg.has_s0 else None
