"""flex_attention(implementation="pallas_mosaic_gpu"): the Hopper kernel (Pallas' Mosaic GPU).

Default suite (CPU): every served configuration, forward and gradient, lowered for CUDA (the
text holds the Mosaic GPU custom call, and the gradient the Triton backward's); what it does not
serve raises NotImplementedError. The kernel has no CPU interpret mode (Mosaic GPU's interpreter in
jax 0.10.2 lacks run_state and register-operand wgmma), so the numerical comparisons against the
dense reference are `@pytest.mark.gpu` (they need a Hopper GPU).
"""

import dataclasses
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import block_mask as bm
from attnjax.core import flex
from attnjax.core import masks
from attnjax.kernels import flex_mosaic_gpu
from tests import tolerances

MOSAIC_CALL = "mosaic_gpu"
TRITON_CALL = "xla.gpu.triton"


def _block_sparse(T, S, bq=64, bk=64):
  """A static block mask with empty, partial (causal) and full tiles, tiles of one warpgroup."""
  classes = np.asarray(bm.create_block_mask(masks.causal(), 1, 1, T, S, block_q=bq,
                                            block_kv=bk).classes())
  classes[..., 1::3, 0] = bm.EMPTY           # a few empty tiles off the diagonal
  return bm.BlockMask.from_classes(classes, seq_lengths=(T, S), block_size=(bq, bk),
                                   mask_mod=masks.causal())


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  H: int = 64
  h: int = 64
  N: int = 4
  K: int = 2                    # GQA: 2 query heads per kv head
  T: int = 256
  S: int = 256
  dtype: type = jnp.bfloat16
  mask_mod: Optional[Callable] = None
  block_mask: Optional[Callable] = None      # (T, S) -> BlockMask


CASES = [
    Case("h64_gqa", H=64, h=64),
    Case("h64_gqa_causal", H=64, h=64, mask_mod=masks.causal()),
    Case("h128_gqa", H=128, h=128, T=200, S=300),                    # padded T and S
    Case("h128_gqa_causal", H=128, h=128, T=200, S=300, mask_mod=masks.causal()),
    Case("h256_causal_fp16", H=256, h=256, K=4, dtype=jnp.float16, mask_mod=masks.causal()),
    Case("h64_v128_window", H=64, h=128, mask_mod=masks.sliding_window(100, 0, offset=30)),
    Case("block_sparse_one_warpgroup", H=64, h=64, T=256, S=320, block_mask=_block_sparse),
]


def _inputs(case: Case, B=2):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, case.T, case.N, case.H), case.dtype)
  k = jax.random.normal(keys[1], (B, case.S, case.K, case.H), case.dtype)
  v = jax.random.normal(keys[2], (B, case.S, case.K, case.h), case.dtype)
  dout = jax.random.normal(keys[3], (B, case.T, case.N, case.h), case.dtype)
  return q, k, v, dout


def _fns(case: Case, implementation: str):
  block_mask = case.block_mask(case.T, case.S) if case.block_mask else None

  def forward(q, k, v):
    return flex.flex_attention(q, k, v, mask_mod=case.mask_mod, block_mask=block_mask,
                               return_residuals=True, implementation=implementation)

  def grads(q, k, v, dout):
    def loss(q, k, v):
      out, lse = forward(q, k, v)
      return (jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
              + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return forward, grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lowers_for_cuda(case):
  q, k, v, dout = _inputs(case)
  forward, grads = _fns(case, "pallas_mosaic_gpu")
  text = flex_mosaic_gpu.lower_for_cuda(forward, q, k, v)
  assert MOSAIC_CALL in text and TRITON_CALL not in text
  text = flex_mosaic_gpu.lower_for_cuda(grads, q, k, v, dout)
  assert MOSAIC_CALL in text and TRITON_CALL in text      # forward kernel + Triton dq, dk/dv


def _call(q, k, v, **kw):
  return flex.flex_attention(q, k, v, implementation="pallas_mosaic_gpu", **kw)


def test_what_it_does_not_serve_raises_not_implemented():
  q, k, v, _ = _inputs(Case("x"), B=1)
  seg = np.zeros((1, 256), np.int32)
  rejected = [
      dict(score_mod=lambda s, b, n, qi, ki: s * 0.5),
      dict(normalizer="softpick"),
      dict(mask_mod=masks.document(seg, seg)),                       # a captured array
      dict(block_mask=bm.create_block_mask(masks.causal(), 1, 1, 256, 256, block_q=32, block_kv=32)),
  ]
  with flex_mosaic_gpu.compiled_for_gpu():
    for kw in rejected:
      with pytest.raises(NotImplementedError, match="pallas_mosaic_gpu"):
        _call(q, k, v, **kw)
    with pytest.raises(NotImplementedError, match="bfloat16 or all float16"):
      _call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    with pytest.raises(NotImplementedError, match="head dims"):
      _call(q[..., :32], k[..., :32], v)

    @jax.jit
    def traced_segments(q, k, v, seg):          # a block mask built from a traced array
      return _call(q, k, v, mask_mod=masks.document(seg, seg))
    with pytest.raises(NotImplementedError, match="static"):
      traced_segments(q, k, v, jnp.asarray(seg))


def test_off_hopper_raises_and_cpu_dispatch_skips_it():
  q, k, v, _ = _inputs(Case("x"), B=1)
  if not any(flex_mosaic_gpu.is_hopper(d) for d in jax.devices() if d.platform == "gpu"):
    with pytest.raises(NotImplementedError, match="Hopper"):
      _call(q, k, v)
  out = flex.flex_attention(q, k, v, mask_mod=masks.causal())      # automatic: never this row on CPU
  assert out.shape == q.shape


def test_is_hopper():
  @dataclasses.dataclass
  class Device:
    device_kind: str
    compute_capability: Optional[str] = None
  assert flex_mosaic_gpu.is_hopper(Device("NVIDIA H100 80GB HBM3", "9.0"))
  assert not flex_mosaic_gpu.is_hopper(Device("NVIDIA A100-SXM4-80GB", "8.0"))
  assert not flex_mosaic_gpu.is_hopper(Device("NVIDIA B200", "10.0"))
  no_capability = type("D", (), {"device_kind": "NVIDIA H200"})()
  assert flex_mosaic_gpu.is_hopper(no_capability)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_on_hopper(case):
  if not flex_mosaic_gpu.is_hopper(jax.devices()[0]):
    pytest.skip("needs a Hopper GPU")
  q, k, v, dout = _inputs(case)
  forward, grads = _fns(case, "pallas_mosaic_gpu")
  ref_forward, ref_grads = _fns(case, "reference")
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  out, lse = jax.jit(forward)(q, k, v)
  want_out, want_lse = jax.jit(ref_forward)(*f32((q, k, v)))
  tol = tolerances.output(jnp.bfloat16)
  chex.assert_trees_all_close(f32(out), want_out, **tol)
  chex.assert_trees_all_close(lse, want_lse, **tol)
  got = jax.jit(grads)(q, k, v, dout)
  want = jax.jit(ref_grads)(*f32((q, k, v, dout)))
  chex.assert_trees_all_close(f32(got), want, **tolerances.grad(jnp.bfloat16))
