"""Linformer: with E = F = identity it equals softmax attention; cost linear in length."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops import low_rank
from tests import numpy_math
from tests import tolerances
from tests.ops.low_rank.common import has_t_by_s as _has_t_by_s
from tests.ops.low_rank.common import qkv as _qkv
from tests.ops.low_rank.common import rand as _rand
from tests.ops.low_rank.common import shapes as _shapes

F32 = tolerances.output(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Linformer


def test_linformer_identity_projection_equals_softmax_attention():
  q, k, v = _qkv(T=13, S=13)
  eye = jnp.broadcast_to(jnp.eye(13), (2, 13, 13))
  out = low_rank.linformer_attention(q, k, v, proj_k=eye, proj_v=eye)
  chex.assert_trees_all_close(out, aj.dot_product_attention(q, k, v), **F32)
  shared = low_rank.linformer_attention(q, k, v, proj_k=eye[:1], proj_v=eye[:1])
  chex.assert_trees_all_close(shared, out, **F32)


def test_linformer_slices_projections_to_length_and_rejects_longer_inputs():
  q, k, v = _qkv(T=11, S=9)
  e, f = _rand(7, 2, 5, 16), _rand(8, 2, 5, 16)
  out = low_rank.linformer_attention(q, k, v, proj_k=e, proj_v=f, kv_lengths=jnp.array([9, 6]))
  # Float64 form of softmax(Q (E K)ᵀ / √H)(F V) with padded keys zeroed, GQA head n -> n // 2.
  qn, kn, vn, en, fn = (np.asarray(x, np.float64) for x in (q, k, v, e, f))
  kn[1, 6:], vn[1, 6:] = 0.0, 0.0
  ek = np.einsum("kps,bskh->bpkh", en[:, :, :9], kn).repeat(2, axis=2)
  fv = np.einsum("kps,bskh->bpkh", fn[:, :, :9], vn).repeat(2, axis=2)
  w = numpy_math.softmax(np.einsum("btnh,bpnh->bntp", qn, ek) * 8 ** -0.5)
  chex.assert_trees_all_close(out, np.einsum("bntp,bpnh->btnh", w, fv).astype(np.float32), **F32)
  with pytest.raises(ValueError, match="exceeds the projections' maximum length n=16"):
    low_rank.linformer_attention(*_qkv(S=17), proj_k=e, proj_v=f)


def test_linformer_cost_is_linear_in_length():
  T = S = 131
  q, k, v = _qkv(T=T, S=S, B=1)
  e = _rand(3, 2, 16, 256)
  fn = lambda q, k, v: low_rank.linformer_attention(q, k, v, proj_k=e, proj_v=e,
                                                    implementation="reference")
  assert not _has_t_by_s(_shapes(fn, q, k, v), T, S)
