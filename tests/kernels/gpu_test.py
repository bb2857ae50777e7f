"""The GPU kernels compiled for a real GPU (not interpret mode) against the float32 references, at a
few production-like shapes. Every test is `@pytest.mark.gpu` (skipped without a GPU by
tests/conftest.py); the whole module runs in about a minute on an H100 / H200
(`pytest -m gpu tests/kernels`, experiments/gpu_check.sh).

- flex_attention(implementation="pallas_triton"): outputs, lse and dq, dk, dv; fp32 and bf16,
  causal, GQA, packed documents (traced segment ids), head dims 64 and 128, lengths that are not
  multiples of the tile;
- decode_attention / paged_decode_attention (kernels/decode_triton.py): ragged lengths, GQA, T = 1
  and a causal speculative block of 4, a shuffled page pool;
- gated_linear_attention(implementation="pallas_triton"): outputs, final state and gradients;
- merge_attention_states(implementation="jax_triton") is in tests/kernels/jax_triton_test.py.

Relative RMS errors (`tolerances.GPU_KERNEL_*`): float32 dots may run in TF32 on the GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex, masks
from attnjax.core.linear import gated_linear_attention
from attnjax.kernels import decode_triton
from tests import tolerances

pytestmark = pytest.mark.gpu


def _normal(seed, shape, dtype):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _close(actual, expected, tol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert np.all(np.isfinite(a)), "non-finite values"
    assert tolerances.rel_rms(a, e) < tol, (tolerances.rel_rms(a, e), tol)


# name: (B, T, N, K, D, mask, dtype)
FLEX_CASES = {
    "fp32_causal_gqa_d64": (2, 1000, 8, 2, 64, "causal", jnp.float32),
    "bf16_none_d128": (1, 2048, 8, 8, 128, "none", jnp.bfloat16),
    "bf16_causal_gqa_d128": (2, 777, 8, 2, 128, "causal", jnp.bfloat16),
    "bf16_documents_d64": (2, 1536, 4, 4, 64, "documents", jnp.bfloat16),
}


@functools.cache
def _flex(name, implementation):
  B, T, N, K, D, mask, dtype = FLEX_CASES[name]
  q, k, v, do = (_normal(i, (B, T, n, D), dtype) for i, n in enumerate((N, K, K, N)))
  seg = np.repeat(np.arange(8), -(-T // 8))[:T]
  seg = jnp.asarray(np.stack([seg, np.sort(np.random.default_rng(5).integers(0, 6, T))]), jnp.int32)

  def loss(q, k, v, seg):
    mask_mod = {"causal": masks.causal(), "none": None,
                "documents": masks.and_masks(masks.causal(), masks.document(seg[:B]))}[mask]
    out, lse = flex.flex_attention(q, k, v, mask_mod=mask_mod, return_residuals=True,
                                   implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), (out, lse)

  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      q, k, v, seg)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), (out, lse, grads)), dtype


@pytest.mark.parametrize("name", FLEX_CASES)
def test_flex_pallas_triton_compiled_equals_reference(name):
  (out, lse, grads), dtype = _flex(name, "pallas_triton")
  (want_out, want_lse, want_grads), _ = _flex(name, "reference")
  _close(out, want_out, tolerances.GPU_KERNEL_REL_RMS[dtype])
  _close(lse, want_lse, tolerances.GPU_KERNEL_REL_RMS[jnp.float32])
  _close(grads, want_grads, tolerances.GPU_KERNEL_GRAD_REL_RMS[dtype])


def test_flex_automatic_dispatch_on_gpu_takes_the_kernel():
  q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(lambda q: flex.flex_attention(q, q, q, mask_mod=masks.causal()))(q))
  assert "pallas_call" in jaxpr


# Decode: S = 1000 keys, lengths that end inside tiles and one empty row.
DECODE_LENGTHS = np.array([1000, 517, 0, 64], np.int32)


@pytest.mark.parametrize("T,N,K,D,dtype", [(1, 32, 8, 128, jnp.bfloat16), (4, 8, 2, 64, jnp.float32)],
                         ids=["bf16_t1_gqa4_d128", "fp32_t4_gqa4_d64"])
def test_decode_kernels_compiled_equal_reference(T, N, K, D, dtype):
  B, S, page = len(DECODE_LENGTHS), 1000, 16
  q, k, v = _normal(0, (B, T, N, D), dtype), _normal(1, (B, S, K, D), dtype), _normal(2, (B, S, K, D),
                                                                                      dtype)
  lengths = jnp.asarray(DECODE_LENGTHS)
  offsets = jnp.maximum(lengths - T, 0)
  run = lambda impl: jax.jit(functools.partial(
      decode_triton.decode_attention, causal=True, num_splits=4, implementation=impl))(
          q, k, v, kv_lengths=lengths, q_offset=offsets)
  out, want = run("pallas_triton"), run("reference")
  _close(out, want, tolerances.GPU_KERNEL_REL_RMS[dtype])
  np.testing.assert_array_equal(np.asarray(out[2], np.float32), 0.0)

  # The same cache in shuffled pages of 16 keys (S padded to whole pages).
  max_pages = -(-S // page)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, max_pages * page - S), (0, 0), (0, 0)))
  perm = np.random.default_rng(3).permutation(B * max_pages)
  table = jnp.asarray(perm.reshape(B, max_pages), jnp.int32)
  to_pages = lambda x: jnp.zeros((B * max_pages, page, K, D), dtype).at[perm].set(
      pad(x).reshape(B * max_pages, page, K, D))
  paged = lambda impl: jax.jit(functools.partial(
      decode_triton.paged_decode_attention, causal=True, implementation=impl))(
          q, to_pages(k), to_pages(v), table, lengths, q_offset=offsets)
  _close(paged("pallas_triton"), want, tolerances.GPU_KERNEL_REL_RMS[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_gated_linear_attention_pallas_triton_compiled_equals_reference(dtype):
  B, T, N, K, F, h = 2, 1000, 8, 4, 64, 64
  q, k = jnp.exp(_normal(0, (B, T, N, F), dtype) / 4), jnp.exp(_normal(1, (B, T, K, F), dtype) / 4)
  v = _normal(2, (B, T, K, h), dtype)
  g = -jax.nn.softplus(_normal(3, (B, T, N, F), jnp.float32))
  w = _normal(4, (B, T, N, h), jnp.float32)

  def loss(impl, q, k, v, g):
    out, state = gated_linear_attention(q, k, v, log_decay=g, normalize=True, return_final_state=True,
                                        implementation=impl)
    return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(state), (out, state)

  run = lambda impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3),
                                                has_aux=True))(q, k, v, g)
  (_, got), got_grads = run("pallas_triton")
  (_, want), want_grads = run("reference")
  _close(got, want, tolerances.GPU_KERNEL_REL_RMS[dtype])
  _close(got_grads, want_grads, tolerances.GPU_KERNEL_GRAD_REL_RMS[dtype])
