"""Chunked gated linear attention as Pallas kernels lowered through Triton (forward and backward).

    S_t = G_t ⊙ S_{t-1} + k_t v_tᵀ,   o_t = q_t S_t,     G_t = exp(g_t)   (see `attnjax.core.linear`)

The form `chunked(q, k, v, g, run, state0, *, chunk_size)` has the signature and results of
`linear_forms.chunked`: q, k `[B,N,T,F]`, v `[B,N,T,hv]` float32 (hv = h, or h + 1 when `normalize`
carries z as an extra value column: nothing special happens here), g `[B,N,T,1]` (one log decay per
head and step), `[B,N,T,F]` (one per key channel, GLA) or None, run `[B,T]` (non-decreasing document
runs of packed sequences; the state resets where the run changes) or None, state0 `[B,N,F,hv]` or None
→ `(o [B,N,T,hv], S_T [B,N,F,hv])`. GQA arrives with its K/V heads already repeated.

Tiling (GLA, Yang et al., arXiv:2312.06635, §4; Lightning Attention-2, Qin et al., arXiv:2401.04658):
one program per (batch·head, tile of `block_v` value columns) walks the chunks of C steps in order,
carrying the state tile `S [F, block_v]` in registers. With Λ_t = Σ_{r ≤ t in the chunk} g_r (the
chunk-local cumulative log decay, computed outside the kernel, so Λ ≤ 0) and Λ_C its last value:

    o_t = (q_t ⊙ e^{Λ_t}) S  +  Σ_{s ≤ t} A_ts v_s,       A_ts = Σ_f q_tf k_sf e^{Λ_tf - Λ_sf}
    S  ← e^{Λ_C} ⊙ S  +  Σ_s (k_s ⊙ e^{Λ_C - Λ_s}) v_sᵀ

Every exponent is ≤ 0, so nothing overflows however strong the decay: the state terms are taken
relative to the chunk's start (queries) and end (keys), and the intra-chunk exponent Λ_t - Λ_s is masked
to s ≤ t before `exp`. With one gate per head the decay factors out of the dot product:
A = (Q Kᵀ) ⊙ exp(Λ_t - Λ_s). A per-channel gate does not factor (q e^{Λ}) (k e^{-Λ})ᵀ stably (e^{-Λ}
overflows for strong decays), so A is built column by column, `[C, F]` elementwise per key step, in
chunks of 16 (as fla's intra-sub-chunk kernel does; the xla form factors it at block boundaries instead).

Backward (custom VJP): the forward run under differentiation also stores the state before each chunk
(and the final one), `[B·N, (n_chunks + 1)·F, hv]`: chunk states are stored, not recomputed (the
memory of fla's saved `h`, hv / C times the size of q). One kernel per (batch·head, value tile) walks
the chunks in reverse carrying dS (the cotangent of the state after the chunk), from dS_T:

    dq_t = e^{Λ_t} ⊙ (S dO_t)  + Σ_{s ≤ t} dA_ts k_s ⊙ e^{Λ_t - Λ_s},     dA_ts = dO_t · v_s
    dk_s = e^{Λ_C - Λ_s} ⊙ (dS v_s) + Σ_{t ≥ s} dA_ts q_t ⊙ e^{Λ_t - Λ_s}
    dv_s = (k_s ⊙ e^{Λ_C - Λ_s})ᵀ dS + Σ_{t ≥ s} A_ts dO_t
    dS  ← e^{Λ_C} ⊙ dS + Σ_t (q_t ⊙ e^{Λ_t}) dO_tᵀ                       (at the end: d state0)
    dΛ_t = q_t ⊙ dq_t - k_t ⊙ dk_t  (+ Σ_j S'_·j dS_·j at the chunk's last step, S' the state after it)

dq and dk sum over value columns, so each value tile writes its own partial dq, dk and the chunk-end
terms, summed outside the kernel (deterministic, no atomics); dΛ and then dg (a reverse cumulative sum
within each chunk: autodiff of the cumsum) are formed outside it in XLA.

Packed sequences are masks on the same arithmetic: within a chunk only same-run pairs interact, a
query reads the carried state only in the run it belongs to (the run of the step before the chunk;
the initial state belongs to the first run), only the chunk's last run writes the state, and a chunk
that ends in a new run drops the carried state (its factor e^{Λ_C} becomes 0). The gradient formulas
hold with the same masks (dΛ_C is still Σ_j S'_·j dS_·j).

Supported: no decay, scalar or per-channel log decay, packed runs, an initial state, any T and hv, F up
to `MAX_FEATURES` (padded to tiles of powers of two ≥ 16, Triton's smallest dot; a padded step has k =
v = 0, log decay 0 and the last step's run, so it leaves the state unchanged). Matmuls keep float32
accuracy: TF32x3 on the tensor cores when compiled, IEEE float32 in interpret mode (the forms are
compared at float32 tolerances). Not run or measured on a GPU yet: the tile table's row is a default.
On a CPU the kernels run in Pallas' interpret mode (`kernels.platform`), slowly: automatic dispatch
lists the kernel for "gpu" only. `NotImplementedError` (automatic dispatch then takes `xla`): F >
MAX_FEATURES, and forward-mode autodiff (the custom VJP is reverse mode only; differentiating the
backward again, as grad of grad does, is not supported either).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnjax.core import implementations
from attnjax.kernels import platform

__all__ = ["chunked", "KERNEL"]

KERNEL = "gla_triton"              # the tile table's key (`platform.block_sizes`)
_F32 = jnp.float32
# Steps per chunk with a per-channel gate: the intra-chunk part is C² · F elementwise work per chunk.
CHANNEL_CHUNK = 16
# Largest chunk with a scalar gate or none: the [C, C] scores and [C, F] q, k tiles stay in registers
# (fla's chunk of 64).
MAX_CHUNK = 64
# Largest (padded) feature width: the [F, block_v] state and the [C, F] q, k tiles are not tiled over F.
MAX_FEATURES = 256


def _pow2(n: int) -> int:
  """The smallest power of two >= max(n, 16)."""
  return max(16, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Config:
  """Static kernel settings: chunk C, chunks nc, value tile bv, gate kind ("none", "scalar",
  "channel"), whether runs (packed documents) and an initial state are given, heads N per batch row
  (the runs are per batch row), and Triton's launch settings."""
  C: int
  nc: int
  bv: int
  gate: str
  packed: bool
  has_s0: bool
  heads: int
  num_warps: int
  num_stages: int
  compiled: bool = False       # set where the pallas_call is built (False: interpret mode)

  def params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

  def mm(self, a, b, dims=(1, 0)):
    """a · b contracting a's axis dims[0] with b's axis dims[1], float32 in and out. Compiled: three
    TF32 tensor-core products (TF32x3, float32 accuracy; plain IEEE float32 dots would run on the CUDA
    cores); interpreted: IEEE float32."""
    precision = (jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if self.compiled else
                 jax.lax.Precision.HIGHEST)
    return jax.lax.dot_general(a, b, (((dims[0],), (dims[1],)), ((), ())), precision=precision,
                               preferred_element_type=_F32)


def iota(n: int):
  return jnp.arange(n, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Chunk:
  """What one chunk's arithmetic needs besides q, k, v (None where trivial): Λ (`[C]` for a scalar
  gate, `[C, F]` per channel), the factors of the queries' state readout (`e^{Λ_t}`, `[C, G]`), of
  the keys' state write (`e^{Λ_C - Λ_t}`) and of the carried state (`e^{Λ_C}`, a scalar or `[F, 1]`),
  and with runs: each step's run `[C]` and the same-run mask `[C, C]`. With runs, a query reads the
  carried state only in the run the state belongs to, only the last run's keys are written, and the
  state is dropped when the chunk ends in a new run."""
  lam: object = None
  q_factor: object = None
  k_factor: object = None
  s_factor: object = None
  run: object = None
  same_run: object = None


def times(a, b):
  """a · b, where a None factor is 1."""
  return b if a is None else a * b


def chunk_info(cfg: Config, lam_ref, run_ref, base) -> Chunk:
  """The chunk starting at step `base` (see `Chunk`)."""
  C = cfg.C
  ch = Chunk()
  if cfg.gate == "scalar":
    lam = lam_ref[pl.ds(base, C)]
    end = lam_ref[base + C - 1]
    ch = Chunk(lam, jnp.exp(lam)[:, None], jnp.exp(end - lam)[:, None], jnp.exp(end))
  elif cfg.gate == "channel":
    lam = lam_ref[pl.ds(base, C), :]
    end = lam_ref[base + C - 1, :]
    ch = Chunk(lam, jnp.exp(lam), jnp.exp(end[None, :] - lam), jnp.exp(end)[:, None])
  if run_ref is None:
    return ch
  run = run_ref[pl.ds(base, C)]
  # The carried state belongs to the run of the step before the chunk (the first run for chunk 0,
  # where it is the initial state).
  before, last = run_ref[jnp.maximum(base - 1, 0)], run_ref[base + C - 1]
  flag = lambda x: x.astype(_F32)
  return Chunk(ch.lam, times(ch.q_factor, flag(run == before)[:, None]),
               times(ch.k_factor, flag(run == last)[:, None]), times(ch.s_factor, flag(last == before)),
               run, run[:, None] == run[None, :])


def channel_scan(cfg: Config, q, k_ref, run_ref, ch: Chunk, lam_ref, base, step, init):
  """For each key step s of the chunk: `step(s, w, k_s, carry)` with the exact per-channel weights
  w[t, f] = e^{Λ_tf - Λ_sf} for t ≥ s (in s's run), 0 elsewhere (the exponent is masked before exp, so
  it never overflows)."""
  t = iota(cfg.C)

  def body(s, carry):
    k_s, lam_s = k_ref[base + s, :], lam_ref[base + s, :]
    visible = t >= s
    if ch.run is not None:
      visible = visible & (ch.run == run_ref[base + s])
    w = jnp.exp(jnp.where(visible[:, None], ch.lam - lam_s[None, :], -jnp.inf))
    return step(s, w, k_s, carry)

  return jax.lax.fori_loop(0, cfg.C, body, init)


def scalar_weights(cfg: Config, ch: Chunk):
  """`[C, C]` intra-chunk decay mask: e^{Λ_t - Λ_s} for s ≤ t in the same run (1 without a gate), 0
  elsewhere."""
  t = iota(cfg.C)
  visible = t[:, None] >= t[None, :]
  if ch.same_run is not None:
    visible = visible & ch.same_run
  if ch.lam is None:
    return visible.astype(_F32)
  return jnp.exp(jnp.where(visible, ch.lam[:, None] - ch.lam[None, :], -jnp.inf))


def intra_scores(cfg: Config, q, k, ch: Chunk, k_ref, lam_ref, run_ref, base):
  """A [C, C]: A_ts = Σ_f q_tf k_sf e^{Λ_tf - Λ_sf} for visible s ≤ t, 0 elsewhere."""
  if cfg.gate != "channel":
    return cfg.mm(q, k, (1, 1)) * scalar_weights(cfg, ch)
  cols = iota(cfg.C)[None, :]

  def column(s, w, k_s, A):
    a = jnp.sum(q * k_s[None, :] * w, axis=1)
    return jnp.where(cols == s, a[:, None], A)

  return channel_scan(cfg, q, k_ref, run_ref, ch, lam_ref, base, column,
                      jnp.zeros((cfg.C, cfg.C), _F32))


def decayed(q, k, ch: Chunk):
  """(q_t ⊙ e^{Λ_t}, k_s ⊙ e^{Λ_C - Λ_s}), masked by runs: what reads and writes the state."""
  return times(ch.q_factor, q), times(ch.k_factor, k)


def split_refs(cfg: Config, refs, n_lead):
  """(leading refs, lam_ref, run_ref, the rest): the gate's and the runs' refs (None when absent)
  follow the `n_lead` leading ones."""
  lead, rest = list(refs[:n_lead]), list(refs[n_lead:])
  lam_ref = rest.pop(0) if cfg.gate != "none" else None
  run_ref = rest.pop(0) if cfg.packed else None
  return lead, lam_ref, run_ref, rest


def _forward_kernel(*refs, cfg: Config, save: bool):
  (q_ref, k_ref, v_ref), lam_ref, run_ref, rest = split_refs(cfg, refs, 3)
  s0_ref = rest.pop(0) if cfg.has_s0 else None
  o_ref, sT_ref = rest[:2]
  C, Fp, bv = cfg.C, q_ref.shape[-1], v_ref.shape[-1]

  def body(c, S):
    base = pl.multiple_of(c * C, C)
    rows = pl.ds(base, C)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    if save:   # the state before chunk c, for the backward pass
      rest[2][pl.ds(pl.multiple_of(c * Fp, Fp), Fp), :] = S
    ch = chunk_info(cfg, lam_ref, run_ref, base)
    A = intra_scores(cfg, q, k, ch, k_ref, lam_ref, run_ref, base)
    qd, kd = decayed(q, k, ch)
    o_ref[rows, :] = cfg.mm(A, v) + cfg.mm(qd, S)
    return times(ch.s_factor, S) + cfg.mm(kd, v, (0, 0))

  S0 = s0_ref[...] if s0_ref is not None else jnp.zeros((Fp, bv), _F32)
  S = jax.lax.fori_loop(0, cfg.nc, body, S0)
  sT_ref[...] = S
  if save:
    rest[2][pl.ds(cfg.nc * Fp, Fp), :] = S


def side_specs(cfg: Config, Tp: int, Fp: int):
  """BlockSpecs of the gate's Λ and the runs (when given), over the grid (batch·head, value tile)."""
  specs = []
  if cfg.gate == "scalar":
    specs.append(pl.BlockSpec((None, Tp), lambda i, j: (i, 0)))
  elif cfg.gate == "channel":
    specs.append(pl.BlockSpec((None, Tp, Fp), lambda i, j: (i, 0, 0)))
  if cfg.packed:   # runs are per batch row: program i is head i % N of row i // N
    specs.append(pl.BlockSpec((None, Tp), lambda i, j: (i // cfg.heads, 0)))
  return specs


def _forward(cfg: Config, save: bool, *ins, interpret):
  """Padded `q, k [BN,Tp,Fp]`, `v [BN,Tp,hvp]`, (Λ), (runs), (state0 [BN,Fp,hvp]) → `o`, `S_T` (and, with
  `save`, the states before each chunk and the final one, `[BN, (nc+1)·Fp, hvp]`)."""
  q, v = ins[0], ins[2]
  BN, Tp, Fp = q.shape
  hvp, bv = v.shape[-1], cfg.bv
  seq = lambda D: pl.BlockSpec((None, Tp, D), lambda i, j: (i, 0, 0))
  seq_v = pl.BlockSpec((None, Tp, bv), lambda i, j: (i, 0, j))
  state = lambda rows: pl.BlockSpec((None, rows, bv), lambda i, j: (i, 0, j))
  in_specs = [seq(Fp), seq(Fp), seq_v, *side_specs(cfg, Tp, Fp)] + ([state(Fp)] if cfg.has_s0 else [])
  out_specs = [seq_v, state(Fp)]
  out_shape = [jax.ShapeDtypeStruct((BN, Tp, hvp), _F32), jax.ShapeDtypeStruct((BN, Fp, hvp), _F32)]
  if save:
    out_specs.append(state((cfg.nc + 1) * Fp))
    out_shape.append(jax.ShapeDtypeStruct((BN, (cfg.nc + 1) * Fp, hvp), _F32))
  cfg = dataclasses.replace(cfg, compiled=not interpret)
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg, save=save), grid=(BN, hvp // bv),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, compiler_params=cfg.params(),
      interpret=interpret, name="gla_triton_fwd")(*ins)


# ---------------------------------------------------------------------------------------------------
# Custom VJP over the padded, flattened arrays (padding, the chunk-local cumsum of g and the head
# layout stay outside it, where autodiff transposes them).

def _arrays(*xs):
  return [x for x in xs if x is not None]


def _gla(cfg: Config, q, k, v, lam, run, s0):
  return platform.on_platform(functools.partial(_forward, cfg, False),
                              *_arrays(q, k, v, lam, run, s0))


def _gla_fwd(cfg: Config, q, k, v, lam, run, s0):
  o, sT, states = platform.on_platform(functools.partial(_forward, cfg, True),
                                       *_arrays(q, k, v, lam, run, s0))
  return (o, sT), (q, k, v, lam, run, states)


def _gla_bwd(cfg: Config, residuals, cotangents):
  from attnjax.kernels import gla_triton_bwd  # pylint: disable=import-outside-toplevel
  return gla_triton_bwd.backward(cfg, *residuals, *cotangents)


_gla = jax.custom_vjp(_gla, nondiff_argnums=(0,))
_gla.defvjp(_gla_fwd, _gla_bwd)


def chunk_length(chunk_size: int, T: int, gate: str) -> int:
  """The kernel's chunk: `chunk_size` rounded up to a power of two in [16, MAX_CHUNK], no longer than
  the sequence needs, and CHANNEL_CHUNK with a per-channel gate."""
  C = min(_pow2(chunk_size), _pow2(T), MAX_CHUNK)
  return min(C, CHANNEL_CHUNK) if gate == "channel" else C


def chunked(q, k, v, g, run, state0, *, chunk_size):
  """The chunked form (signature and results of `linear_forms.chunked`) as Pallas Triton kernels."""
  if implementations.under_forward_mode(q, k, v, g, state0):
    raise NotImplementedError(
        "pallas_triton differentiates in reverse mode only (a custom VJP); for forward-mode autodiff "
        "(jax.jvp, jax.jacfwd) use implementation='xla' or None, which picks it")
  B, N, T, F = q.shape
  if _pow2(F) > MAX_FEATURES:
    raise NotImplementedError(f"pallas_triton: feature width {F} > {MAX_FEATURES} is not tiled (the "
                              f"[F, block_v] state stays in registers); 'xla' serves it")
  hv = v.shape[-1]
  gate = "none" if g is None else ("scalar" if g.shape[-1] == 1 else "channel")
  C = chunk_length(chunk_size, T, gate)
  nc = -(-T // C)
  Tp, Fp = nc * C, _pow2(F)
  tiles = platform.block_sizes(KERNEL, head_dim=Fp, dtype=q.dtype)
  bv = min(tiles["block_v"], _pow2(hv))
  hvp = bv * -(-hv // bv)
  cfg = Config(C=C, nc=nc, bv=bv, gate=gate, packed=run is not None, has_s0=state0 is not None,
               heads=N, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
  BN = B * N
  # Padded steps: k = v = 0, log decay 0 and the last step's run, so the state passes through them
  # unchanged.
  pad = lambda x, width: jnp.pad(x.reshape(BN, T, x.shape[-1]),
                                 ((0, 0), (0, Tp - T), (0, width - x.shape[-1])))
  lam = None
  if gate != "none":
    # Chunk-local cumulative log decay: every exponent in the kernel is a difference of these.
    gp = pad(g, 1 if gate == "scalar" else Fp)
    lam = jnp.cumsum(gp.reshape(BN, nc, C, -1), axis=2).reshape(BN, Tp, -1)
    lam = lam[..., 0] if gate == "scalar" else lam
  if run is not None:
    run = jnp.pad(run.astype(jnp.int32), ((0, 0), (0, Tp - T)), mode="edge")
  s0 = None
  if state0 is not None:
    s0 = jnp.pad(state0.reshape(BN, F, hv), ((0, 0), (0, Fp - F), (0, hvp - hv)))
  o, sT = _gla(cfg, pad(q, Fp), pad(k, Fp), pad(v, hvp), lam, run, s0)
  return (o[:, :T, :hv].reshape(B, N, T, hv), sT[:, :F, :hv].reshape(B, N, F, hv))
