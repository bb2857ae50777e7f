"""`flex_attention(..., implementation="pallas_mosaic_gpu")`: a Hopper kernel (Pallas' Mosaic GPU).

    s_ij = scale · q_i·k_j        visible(i, j) = mask_mod(b, n, i, j)
    o_i  = Σ_{j visible} exp(s_ij) v_j / Σ_{j visible} exp(s_ij)     lse_i = log Σ_{j visible} exp(s_ij)

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `out [B,T,N,h]` (q's dtype) and `lse [B,T,N]`
(float32; -inf on a row with no visible key, whose output is zeros). GQA reads kv head n // (N/K)
straight from `k` and `v` (never repeated); H ≠ h is fine.

FlashAttention-3's warp specialization and pingpong schedule (Shah et al., arXiv:2407.08608) on
FlashAttention-2's tiling (Dao, arXiv:2307.08691) over FlexAttention's block mask (Dong et al.,
arXiv:2412.05496). One CTA per (BlockMask query block, query head, batch row) runs `block_q / 64`
compute warpgroups of 64 query rows each and one memory warpgroup. The memory warpgroup streams the
key / value blocks the query block's `BlockMask` lists (partial blocks, then full ones; empty blocks
are never read) into a ring of `stages` shared-memory slots with TMA, each slot guarded by a
"loaded" barrier (TMA completion) and a "consumed" barrier (every compute warpgroup has read it).
Each compute warpgroup keeps its query tile in shared memory and, per key block, issues
`s = q·kᵀ` and `o += p·v` as warpgroup matmuls (wgmma, float32 accumulators in registers) around
an online softmax in registers (exp2 with the log2(e) factor folded into the scale); with two
compute warpgroups a shared barrier alternates them so one's softmax overlaps the other's matmuls.
Partial tiles evaluate `mask_mod` elementwise on iota tiles in the wgmma register layout (and hide
padded keys); full tiles skip it.

Supported (anything else raises NotImplementedError, decided at trace time from the inputs and the
mask_mod's jaxpr, so automatic dispatch falls back): the softmax normalizer; no score_mod; bfloat16 /
float16 q, k, v of one dtype; head dims H, h in {64, 128, 256}; a static BlockMask (numpy; a mask_mod
that captures no traced array) with tiles `block_q` in {64, 128} (one or two compute warpgroups) and
`block_kv` a multiple of 64 up to 256, within shared memory; mask_mods that are elementwise integer
arithmetic and comparisons of `(b, n, q_idx, kv_idx)` (causal with a static offset, sliding windows,
prefix-LM, ...; captured arrays and gathers are not), or none; static or traced scales. Anywhere but
a Hopper GPU (compute capability 9.0) it raises NotImplementedError, a CPU included: Mosaic GPU's
interpret mode in jax 0.10.2 (`InterpretGPUParams`) has no rule for `run_state` (the wgmma
accumulator carried across key blocks) and reads every wgmma operand from shared memory (p·v takes
p from registers), so the kernel cannot run on a CPU. `lower_for_cuda` (here) lowers it for CUDA
on any machine, which is how the default suite checks that each configuration compiles.

Backward: a custom VJP whose residuals (out, lse) are those of the `pallas_triton` forward, so the
gradients are `flex_triton_bwd`'s kernels (dq; dk/dv), lowered through Triton, run on the same block
lists and mask_mod; the lse cotangent is honoured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu_mgpu

from attnjax.core import block_mask as bm
from attnjax.core.normalizers import Normalizer
from attnjax.kernels import flex_triton, platform
from attnjax.kernels.mods import flat_table, prepare_mod
from attnjax.typing import Key, LogSumExp, MaskMod, Output, Query, ScoreMod, Value

__all__ = ["flex_mosaic_gpu_attention", "lower_for_cuda", "compiled_for_gpu", "is_hopper", "KERNEL"]

KERNEL = "flex_mosaic_gpu"
WG_ROWS = 64                    # query rows per compute warpgroup (the wgmma M)
HEAD_DIMS = (64, 128, 256)
SMEM_BYTES = 227 * 1024         # Hopper's shared memory per block (opt-in maximum)
LOG2E = math.log2(math.e)

KERNEL = "flex_mosaic_gpu"      # the tile table's key (`platform.block_sizes`)

# Primitives a mask_mod may use inside the kernel: elementwise integer / boolean arithmetic with a
# Mosaic GPU lowering rule (no gathers, so no captured arrays indexed by position).
_MASK_PRIMITIVES = frozenset({
    "add", "sub", "mul", "neg", "max", "min", "abs", "ge", "gt", "le", "lt", "eq", "ne", "and", "or",
    "not", "xor", "select_n", "convert_element_type", "broadcast_in_dim", "squeeze", "reshape",
    "pjit", "jit", "clamp"})


def is_hopper(device) -> bool:
  """Whether a JAX device is a Hopper GPU (compute capability 9.0: H100, H200, H800, H20, GH200), the
  only architecture with wgmma."""
  capability = getattr(device, "compute_capability", None)
  if capability is not None:
    return str(capability) == "9.0"
  kind = device.device_kind.lower()
  return any(name in kind.split() for name in ("h100", "h200", "h800", "h20", "gh200"))


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True, eq=False)
class Config:
  """What the kernel needs besides arrays (static under jit)."""
  mask_mod: Optional[MaskMod]
  scale: float
  S: int
  G: int                  # query heads per kv head
  bq: int
  bk: int
  stages: int
  Bm: int                 # batch rows / heads of the block lists (1: shared)
  Nm: int
  pingpong: bool = True

  @property
  def wgs(self) -> int:
    return self.bq // WG_ROWS


# ----------------------------------------------------------------------------------------------------
# The kernel


def _kernel(q_ref, k_ref, v_ref, pnum, pidx, fnum, fidx, o_ref, lse_ref, scoped, *, cfg: Config):
  (q_smem, o_smem, lse_smem, k_smem, v_smem), (q_bar, k_bar, v_bar), (k_done, v_done), sched = scoped
  b, n, i = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
  wg = lax.axis_index("wg")
  lb = b if cfg.Bm > 1 else 0
  ln = n if cfg.Nm > 1 else 0
  n_partial, n_full = pnum[lb, ln, i], fnum[lb, ln, i]
  n_steps = n_partial + n_full
  nkv = pidx.shape[-1]
  dtype, hv = q_ref.dtype, v_ref.shape[-1]
  pingpong = cfg.pingpong and cfg.wgs == 2

  def kv_block(t):
    """The key block of pipeline step t: the partial blocks first, then the full ones."""
    jp = pidx[lb, ln, i, jnp.minimum(t, nkv - 1)]
    jf = fidx[lb, ln, i, jnp.clip(t - n_partial, 0, nkv - 1)]
    return jnp.where(t < n_partial, jp, jf)

  def schedule():
    if pingpong:
      plgpu_mgpu.barrier_arrive(sched)
      plgpu_mgpu.barrier_wait(sched)

  @pl.when(wg < cfg.wgs)
  def _compute():
    plgpu_mgpu.set_max_registers(232 if cfg.wgs == 2 else 240, action="increase")
    row0 = i * cfg.bq + wg * WG_ROWS
    q_tile = q_smem.at[wg]
    plgpu_mgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, WG_ROWS), n], q_tile, q_bar.at[wg])
    plgpu_mgpu.barrier_wait(q_bar.at[wg])

    wgmma_layout = plgpu_mgpu.Layout.WGMMA
    rows = plgpu_mgpu.Layout.WGMMA.reduce(1)
    m = plgpu_mgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), rows)
    l = plgpu_mgpu.layout_cast(jnp.full((WG_ROWS,), 0.0, jnp.float32), rows)
    acc = plgpu_mgpu.layout_cast(jnp.full((WG_ROWS, hv), 0.0, jnp.float32), wgmma_layout)
    if pingpong:
      pl.when(wg == 1)(schedule)

    def step(masked):
      def body(t, carry):
        acc, m, l = carry
        slot = lax.rem(t, cfg.stages)
        plgpu_mgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
          plgpu_mgpu.wgmma(acc_ref, q_tile, plgpu_mgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          schedule()
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu_mgpu.ACC((WG_ROWS, cfg.bk), jnp.float32))
        plgpu_mgpu.barrier_arrive(k_done.at[slot])
        s = s * (cfg.scale * LOG2E)                 # log2 units: exp(x) = exp2(x · log2 e)
        if masked:
          j = kv_block(t)
          qi = row0 + plgpu_mgpu.broadcasted_iota(jnp.int32, (WG_ROWS, cfg.bk), 0, layout=wgmma_layout)
          ki = j * cfg.bk + plgpu_mgpu.broadcasted_iota(jnp.int32, (WG_ROWS, cfg.bk), 1,
                                                        layout=wgmma_layout)
          keep = ki < cfg.S
          if cfg.mask_mod is not None:
            keep = jnp.logical_and(keep, cfg.mask_mod(b, n, qi, ki))
          s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        # A row with no visible key so far keeps m = -inf; shift it by 0 (exp2(-inf - 0) = 0).
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        if pingpong:
          plgpu_mgpu.barrier_arrive(sched)          # softmax done
        plgpu_mgpu.barrier_wait(v_bar.at[slot])
        if pingpong:
          plgpu_mgpu.barrier_wait(sched)            # the tensor cores are ours again

        def pv(acc_ref):
          plgpu_mgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        acc = pl.run_state(pv)(plgpu_mgpu.ACC.init(acc))
        plgpu_mgpu.barrier_arrive(v_done.at[slot])
        return acc, m_new, l
      return body

    carry = lax.fori_loop(0, n_partial, step(True), (acc, m, l))
    acc, m, l = lax.fori_loop(n_partial, n_steps, step(False), carry)
    if pingpong:
      pl.when(wg == 0)(schedule)

    empty = l == 0.0                                # no visible key (softmax: l >= 1 otherwise)
    l_safe = jnp.where(empty, 1.0, l)
    out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
    o_tile = o_smem.at[wg]
    o_tile[...] = out.astype(dtype)
    lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * (1.0 / LOG2E))
    plgpu_mgpu.commit_smem()
    plgpu_mgpu.copy_smem_to_gmem(o_tile, o_ref.at[b, pl.ds(row0, WG_ROWS), n])
    plgpu_mgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, pl.ds(row0, WG_ROWS)])
    plgpu_mgpu.wait_smem_to_gmem(0)

  @pl.when(wg == cfg.wgs)
  def _memory():
    plgpu_mgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(n, jnp.array(cfg.G, n.dtype))

    @pl.loop(0, n_steps)
    def _(t):
      slot = lax.rem(t, cfg.stages)
      rows = (b, pl.ds(kv_block(t) * cfg.bk, cfg.bk), kv_head)

      @pl.when(t >= cfg.stages)      # the slot's previous block must be read by every warpgroup
      def _():
        plgpu_mgpu.barrier_wait(k_done.at[slot])
      plgpu_mgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])

      @pl.when(t >= cfg.stages)
      def _():
        plgpu_mgpu.barrier_wait(v_done.at[slot])
      plgpu_mgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])


def _smem_bytes(cfg: Config, H: int, hv: int, itemsize: int) -> int:
  """Shared memory of one CTA: q (and out) tiles, lse rows, the K/V ring."""
  qo = cfg.wgs * WG_ROWS * (H + (hv if hv != H else 0)) * itemsize
  return qo + cfg.wgs * WG_ROWS * 4 + cfg.stages * cfg.bk * (H + hv) * itemsize


def forward(cfg: Config, q, k, v, lists):
  """Padded `q [B,Tp,N,H]`, `k [B,Sp,K,H]`, `v [B,Sp,K,h]` → `out [B,Tp,N,h]`, `lse [B,N,Tp]`."""
  B, Tp, N, H = q.shape
  hv, dtype = v.shape[-1], q.dtype
  wgs = cfg.wgs
  transforms = lambda d: (plgpu_mgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
                          plgpu_mgpu.SwizzleTransform(128))
  q_smem = plgpu_mgpu.SMEM((wgs, WG_ROWS, H), dtype, transforms=transforms(H))

  def entry(q_ref, k_ref, v_ref, pnum, pidx, fnum, fidx, o_ref, lse_ref):
    def scoped(q_s, o_s, lse_s, k_s, v_s, q_bar, k_bar, v_bar, k_done, v_done, sched):
      _kernel(q_ref, k_ref, v_ref, pnum, pidx, fnum, fidx, o_ref, lse_ref,
              ((q_s, q_s if o_s is None else o_s, lse_s, k_s, v_s), (q_bar, k_bar, v_bar),
               (k_done, v_done), sched), cfg=cfg)
    pl.run_scoped(
        scoped, q_smem,
        None if hv == H else plgpu_mgpu.SMEM((wgs, WG_ROWS, hv), dtype, transforms=transforms(hv)),
        plgpu_mgpu.SMEM((wgs, WG_ROWS), jnp.float32),
        plgpu_mgpu.SMEM((cfg.stages, cfg.bk, H), dtype, transforms=transforms(H)),
        plgpu_mgpu.SMEM((cfg.stages, cfg.bk, hv), dtype, transforms=transforms(hv)),
        plgpu_mgpu.Barrier(num_barriers=wgs),
        plgpu_mgpu.Barrier(num_barriers=cfg.stages),
        plgpu_mgpu.Barrier(num_barriers=cfg.stages),
        plgpu_mgpu.Barrier(num_arrivals=wgs, num_barriers=cfg.stages),
        plgpu_mgpu.Barrier(num_arrivals=wgs, num_barriers=cfg.stages),
        plgpu_mgpu.Barrier(num_arrivals=wgs),
        collective_axes="wg")

  run = plgpu_mgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((B, Tp, N, hv), dtype),
                jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
      grid=(N, Tp // cfg.bq, B), grid_names=("heads", "q_seq", "batch"),
      num_threads=wgs + 1, thread_name="wg",
      compiler_params=plgpu_mgpu.CompilerParams(approx_math=True),
      kernel_name="flex_mosaic_gpu_fwd")
  return run(q, k, v, *lists)


# ----------------------------------------------------------------------------------------------------
# Custom VJP (backward: the Triton kernels) and the public entry


_COMPILED = threading.local()


@contextlib.contextmanager
def compiled_for_gpu():
  """Traces the kernel compiled for the GPU whatever the default backend: how `lower_for_cuda` checks
  on a CPU-only machine that it compiles. (The kernel cannot run on a CPU, see the module docstring,
  so it does not choose by the platform it is lowered for as `platform.on_platform` does.)"""
  previous = getattr(_COMPILED, "on", False)
  _COMPILED.on = True
  try:
    yield
  finally:
    _COMPILED.on = previous


def lower_for_cuda(fn, *args, **kwargs) -> str:
  """`platform.lower_for_cuda` with this kernel traced for the GPU (`compiled_for_gpu`)."""
  with compiled_for_gpu():
    return platform.lower_for_cuda(fn, *args, **kwargs)


def _impl(cfg, tcfg, q, k, v, lists, rlists, tables):
  return forward(cfg, q, k, v, lists)


def _fwd(cfg, tcfg, q, k, v, lists, rlists, tables):
  out, lse = _impl(cfg, tcfg, q, k, v, lists, rlists, tables)
  return (out, lse), (q, k, v, lists, rlists, tables, out, lse)


def _bwd(cfg, tcfg, residuals, cotangents):
  from attnjax.kernels import flex_triton_bwd
  q, k, v, lists, rlists, tables, out, lse = residuals
  dq, dk, dv, _ = flex_triton_bwd.backward(tcfg, q, k, v, lists, rlists, tables, out, lse,
                                           *cotangents)
  return dq, dk, dv, None, None, None


_attention = jax.custom_vjp(_impl, nondiff_argnums=(0, 1))
_attention.defvjp(_fwd, _bwd)


def _inner_primitives(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _inner_primitives(getattr(inner, "jaxpr", inner))


def _check_mask_mod(mask_mod: MaskMod, bk: int):
  """NotImplementedError unless `mask_mod` is elementwise index arithmetic the kernel can evaluate on
  `[64, bk]` int32 tiles with scalar `b`, `n` (no captured arrays beyond scalars)."""
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  try:
    closed = jax.make_jaxpr(mask_mod)(i32(), i32(), i32(WG_ROWS, bk), i32(WG_ROWS, bk))
  except Exception as e:       # e.g. indexing a captured array by a scalar batch row
    raise NotImplementedError(
        f"pallas_mosaic_gpu: mask_mod cannot be traced on index tiles ({e})") from None
  if any(np.size(c) > 1 for c in closed.consts):
    raise NotImplementedError("pallas_mosaic_gpu: mask_mod captures arrays (only scalars are served)")
  bad = sorted(set(_inner_primitives(closed.jaxpr)) - _MASK_PRIMITIVES)
  if bad:
    raise NotImplementedError(f"pallas_mosaic_gpu: mask_mod uses {bad}, which the kernel does not "
                              "evaluate (elementwise integer arithmetic and comparisons only)")
  if closed.out_avals[0].shape not in ((WG_ROWS, bk), ()) or closed.out_avals[0].dtype != jnp.bool_:
    raise NotImplementedError("pallas_mosaic_gpu: mask_mod must return a boolean of the tile's shape")


def _tile_sizes(H: int, hv: int, dtype):
  return platform.block_sizes(KERNEL, head_dim=max(H, hv), dtype=dtype)


def flex_mosaic_gpu_attention(q: Query, k: Key, v: Value, *, score_mod: Optional[ScoreMod],
                              mask_mod: Optional[MaskMod], block_mask: Optional[bm.BlockMask],
                              normalizer: Normalizer, scale) -> tuple[Output, LogSumExp]:
  """`flex_attention`'s `pallas_mosaic_gpu` form on checked inputs: `(out [B,T,N,h] in q's dtype,
  lse [B,T,N] float32)`; raises NotImplementedError for what it does not serve (module docstring).

  The block mask is built from `mask_mod` when none is given, with `block_q = 128` and
  `block_kv = 128` (64 at head dim 256); a given one must have tiles the kernel serves.
  """
  B, T, N, H = q.shape
  S, K, hv = k.shape[1], k.shape[2], v.shape[3]
  name = "pallas_mosaic_gpu"
  if not getattr(_COMPILED, "on", False):
    device = jax.devices()[0]
    if device.platform != "gpu" or not is_hopper(device):
      raise NotImplementedError(
          f"{name}: needs a Hopper GPU (sm_90), got {device.device_kind!r} (on a CPU the kernel has no "
          "interpret mode: Mosaic GPU's cannot run register-operand wgmma or run_state)")
  if normalizer.name != "softmax":
    raise NotImplementedError(f"{name}: serves the softmax normalizer only, got {normalizer.name!r}")
  if score_mod is not None:
    raise NotImplementedError(f"{name}: score_mod is not served (use pallas_triton or xla)")
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise NotImplementedError(f"{name}: q, k, v must all be bfloat16 or all float16, got "
                              f"{(q.dtype, k.dtype, v.dtype)}")
  if H not in HEAD_DIMS or hv not in HEAD_DIMS:
    raise NotImplementedError(f"{name}: head dims (H, h) = {(H, hv)} must be in {HEAD_DIMS}")
  sizes = _tile_sizes(H, hv, q.dtype)
  if block_mask is None:
    block_mask = bm.create_block_mask(mask_mod, B, N, T, S, block_q=sizes["block_q"],
                                      block_kv=sizes["block_kv"])
  if not block_mask.is_static:
    raise NotImplementedError(f"{name}: the block mask must be static (its mask_mod captures a traced "
                              "array)")
  bq, bk = block_mask.block_size
  if bq not in (64, 128) or bk % 64 or bk > 256:
    raise NotImplementedError(f"{name}: block sizes {(bq, bk)} not served (block_q in (64, 128), "
                              "block_kv a multiple of 64 up to 256)")
  if mask_mod is not None:
    _check_mask_mod(mask_mod, bk)
  if not isinstance(scale, (int, float, np.floating)):
    # A traced scale folds into q so that autodiff reaches it; the kernel's scale stays static.
    q, scale = q * jnp.asarray(scale, q.dtype), 1.0

  classes = np.asarray(block_mask.classes())
  if S % bk:      # the tail key block holds padding keys, hidden on partial tiles only
    classes[..., -1] = np.where(classes[..., -1] == bm.FULL, bm.PARTIAL, classes[..., -1])
  block_mask = bm.BlockMask.from_classes(classes, seq_lengths=(T, S), block_size=(bq, bk),
                                         mask_mod=mask_mod, varies=block_mask.varies)
  lists, rlists = flex_triton.block_lists(block_mask)
  Bm, Nm = lists[0].shape[:2]
  cfg = Config(mask_mod, float(scale), S, N // K, bq, bk, sizes["stages"], Bm, Nm)
  if (used := _smem_bytes(cfg, H, hv, q.dtype.itemsize)) > SMEM_BYTES:
    raise NotImplementedError(f"{name}: tiles {(bq, bk)} at head dims {(H, hv)} need {used} bytes of "
                              f"shared memory (> {SMEM_BYTES})")
  # The backward pass: the pallas_triton kernels on the same tiles, lists and mask.
  tsizes = platform.block_sizes(flex_triton.KERNEL, head_dim=H, dtype=q.dtype)
  mask, tables = None, ()
  if mask_mod is not None:
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    mask, tables = prepare_mod(lambda *ix: jnp.asarray(mask_mod(*ix), bool),
                               (i32(1, 1), i32(1, 1), i32(bq, 1), i32(1, bk)), float_grads=False)
    tables = tuple(map(flat_table, tables))     # captured scalars at most (_check_mask_mod)
  tcfg = flex_triton.Config(None, mask, normalizer, float(scale), T, S, N // K, bq, bk, Bm, Nm,
                            tsizes.get("num_warps", 4), tsizes.get("num_stages", 2))

  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  pad = lambda x, L: jnp.pad(x, ((0, 0), (0, L - x.shape[1]), (0, 0), (0, 0)))
  out, lse = _attention(cfg, tcfg, pad(q, Tp), pad(k, Sp), pad(v, Sp), lists, rlists, tables)
  return out[:, :T], jnp.swapaxes(lse, 1, 2)[:, :T]
