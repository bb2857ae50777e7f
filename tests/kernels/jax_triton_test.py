"""`merge_attention_states(implementation="jax_triton")`: the Triton merge kernel and its JAX wrapper.

- Where `triton` and `torch` are importable: the kernel's source run by Triton's interpreter
  (`TRITON_INTERPRET=1`, in a subprocess: the interpreter must be chosen before `triton` is imported)
  against a float64 numpy merge, with empty parts, all-empty rows, a head dim that is not a power of
  two and a row count that is not a multiple of the row tile.
- Everywhere: the wrapper's custom VJP and batching rule (with the XLA merge standing in for the
  kernel), the dispatch (automatic dispatch on a CPU keeps `xla`; the named kernel raises
  `NotImplementedError` naming what is missing).
- On a GPU (`@pytest.mark.gpu`): the kernel through jax-triton equals the XLA merge, values and
  gradients, also under vmap.
"""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import merge
from attnjax.kernels import jax_triton_merge
from tests import tolerances

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _states(m=3, lead=(2, 5, 3), h=24, seed=0, dtype=np.float32):
  """`outs [m, *lead, h]`, `lses [m, *lead]` with some empty parts and one all-empty row."""
  rng = np.random.default_rng(seed)
  outs = rng.standard_normal((m, *lead, h)).astype(dtype)
  lses = (3 * rng.standard_normal((m, *lead))).astype(np.float32)
  rows = lses.reshape(m, -1)                  # a view: rows by flat index
  rows[0, 1] = -np.inf                        # one empty part
  rows[:, 2] = -np.inf                        # every part of this row empty
  rows[1:, 4] = -np.inf                       # only part 0 present (a no-op when m = 1)
  return outs, lses


def numpy_merge(outs, lses):
  """Float64 rewrite of the merge: lse = log Σ e^{lse_i}, o = Σ e^{lse_i - lse} o_i."""
  outs, lses = np.asarray(outs, np.float64), np.asarray(lses, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    lse = np.logaddexp.reduce(lses, axis=0)
    w = np.where(np.isneginf(lses), 0.0, np.exp(lses - np.where(np.isneginf(lse), 0.0, lse)))
  return np.sum(w[..., None] * outs, axis=0), lse


def _interpreter_check():
  """Runs in a subprocess with TRITON_INTERPRET=1: the kernel on torch CPU tensors."""
  import torch  # pylint: disable=g-import-not-at-top
  from attnjax.kernels import triton_merge_kernel  # pylint: disable=g-import-not-at-top
  for m, lead, h, dtype in ((3, (2, 5, 3), 24, torch.float32), (1, (7,), 16, torch.float32),
                            (4, (3, 6), 64, torch.bfloat16)):
    outs, lses = _states(m, lead, h)
    o = torch.from_numpy(outs).to(dtype)
    R = int(np.prod(lead))
    out, lse = torch.empty(R, h, dtype=dtype), torch.empty(R)
    block_r, block_d = jax_triton_merge.tile_sizes(R, h)
    block_r = min(block_r, 4)                 # several programs, the last one partial
    triton_merge_kernel.merge_kernel[(-(-R // block_r),)](
        o.reshape(m, R, h).contiguous(), torch.from_numpy(lses).reshape(m, R).contiguous(), out, lse,
        M=m, R=R, D=h, BLOCK_R=block_r, BLOCK_D=block_d)
    want_out, want_lse = numpy_merge(o.float().numpy(), lses)
    tol = tolerances.output(jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
    np.testing.assert_allclose(out.float().numpy().reshape(want_out.shape), want_out, **tol)
    np.testing.assert_array_equal(np.isneginf(lse.numpy()), np.isneginf(want_lse).reshape(-1))
    finite = np.isfinite(want_lse).reshape(-1)
    np.testing.assert_allclose(lse.numpy()[finite], want_lse.reshape(-1)[finite],
                               **tolerances.output(jnp.float32))
    np.testing.assert_array_equal(out.float().numpy()[~finite], 0.0)
  print("interpreter check passed")


def test_kernel_source_in_the_triton_interpreter():
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", "from tests.kernels.jax_triton_test import "
                        "_interpreter_check; _interpreter_check()"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0 and "interpreter check passed" in run.stdout, run.stdout + run.stderr


def _wrapped(outs, lses):
  """The jax_triton wrapper (custom VJP, batching rule) around the XLA merge in place of the kernel."""
  return jax_triton_merge.merge(outs, lses, xla_merge=merge._xla_merge,  # pylint: disable=protected-access
                                call=merge._xla_merge)  # pylint: disable=protected-access


def _loss(fn):
  return lambda o, l: (lambda r: jnp.sum(r[0] * jnp.cos(o[0])) + jnp.sum(
      jnp.where(jnp.isfinite(r[1]), r[1], 0.0)))(fn(o, l))


def test_wrapper_gradients_and_vmap_equal_xla():
  outs, lses = (jnp.asarray(x) for x in _states())
  xla = merge._xla_merge  # pylint: disable=protected-access
  grads = jax.jit(jax.grad(_loss(_wrapped), argnums=(0, 1)))(outs, lses)
  want = jax.jit(jax.grad(_loss(xla), argnums=(0, 1)))(outs, lses)
  chex.assert_trees_all_close(grads, want, **tolerances.grad(jnp.float32))
  # vmap over a row axis of both, and of outs only (lses broadcast).
  for axes, l in (((2, 2), lses), ((2, None), lses[:, :, 0])):
    got = jax.jit(jax.vmap(_wrapped, in_axes=axes))(outs, l)
    chex.assert_trees_all_close(got, jax.vmap(xla, in_axes=axes)(outs, l),
                                **tolerances.output(jnp.float32))


def test_cpu_dispatch_keeps_xla_and_the_named_kernel_says_why_not():
  outs, lses = (jnp.asarray(x) for x in _states())
  out, lse = merge.merge_attention_states(list(outs), list(lses))
  want_out, want_lse = numpy_merge(outs, lses)
  np.testing.assert_allclose(out, want_out, **tolerances.output(jnp.float32))
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  if jax.default_backend() != "gpu":
    jaxpr = str(jax.make_jaxpr(merge.merge_attention_states)(outs, lses))
    assert "triton" not in jaxpr
    with pytest.raises(NotImplementedError, match="jax_triton"):
      merge.merge_attention_states(outs, lses, implementation="jax_triton")
  with pytest.raises(ValueError, match="unknown implementation"):
    merge.merge_attention_states(outs, lses, implementation="pallas_triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_jax_triton_kernel_equals_xla_on_gpu(dtype):
  outs, lses = _states(m=4, lead=(2, 33, 5), h=80)
  outs, lses = jnp.asarray(outs, dtype), jnp.asarray(lses)
  fn = lambda impl: jax.jit(lambda o, l: merge.merge_attention_states(o, l, implementation=impl))
  (out, lse), (want_out, want_lse) = fn("jax_triton")(outs, lses), fn("xla")(outs, lses)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(out), f32(want_out), **tolerances.output(dtype))
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  finite = np.isfinite(np.asarray(want_lse))
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite],
                             **tolerances.output(jnp.float32))
  # Automatic dispatch on a GPU takes the kernel; gradients and vmap go through its wrappers.
  assert "triton" in str(jax.make_jaxpr(merge.merge_attention_states)(outs, lses))
  impl = lambda name: (lambda o, l: merge.merge_attention_states(o, l, implementation=name))
  grads = jax.jit(jax.grad(_loss(impl("jax_triton")), argnums=(0, 1)))(outs, lses)
  want = jax.jit(jax.grad(_loss(impl("xla")), argnums=(0, 1)))(outs, lses)
  chex.assert_trees_all_close(jax.tree.map(f32, grads), jax.tree.map(f32, want),
                              **tolerances.grad(dtype))
  got = jax.jit(jax.vmap(impl("jax_triton"), in_axes=(3, 3)))(outs, lses)
  chex.assert_trees_all_close(jax.tree.map(f32, got),
                              jax.tree.map(f32, jax.vmap(impl("xla"), in_axes=(3, 3))(outs, lses)),
                              **tolerances.output(dtype))
