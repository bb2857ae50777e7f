"""NSA (arXiv:2502.11089): o = g_cmp·o_cmp + g_slc·o_slc + g_win·o_win, three branches over
MLP-compressed blocks, the top-n blocks the compressed attention scores (shared by a GQA group,
first + 2 local blocks forced), and a sliding window.

Checked against a float64 numpy rewrite written from the paper's equations (φ a GELU MLP over the
position-encoded block, eq. 9 as overlap counts computed by loops, eq. 10 group sums, explicit per
query top-n), branch by branch through one-hot gates and with mixed gates, causal and not, GQA,
both implementations; and the paper's properties: selecting every block makes the selected branch
full attention; a GQA group shares one selection, which the group's summed scores decide.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex
from attnjax.ops.sparse import nsa
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, HV = 2, 19, 4, 2, 8, 6
L, D, LSEL, W = 4, 2, 4, 4      # compression block and stride, selection block, window
NUM = 4                          # selected blocks (3 forced + 1 by score)


def _params(seed=0):
  shapes = {name: f(N, K, H, HV, block=L) for name, f, _, _ in nsa.NSA_TABLE}
  rng = np.random.default_rng(seed)
  return {name: (rng.standard_normal(shape) * (0.5 if "pos" in name else shape[-2] ** -0.5)
                 ).astype(np.float32) for name, shape in shapes.items()}


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _phi(x, pos, w1, w2):
  """Compressed tokens [nc, K, D] of x [S, K, D] (float64)."""
  out = []
  for i in range((x.shape[0] - L) // D + 1):
    block = x[i * D:i * D + L] + pos                                        # [L, K, D]
    out.append(np.stack([_gelu(block[:, kh].reshape(-1) @ w1[kh]) @ w2[kh]
                         for kh in range(x.shape[1])]))
  return np.stack(out)


def _nsa_numpy(q, k, v, gates, params, *, causal, num_selected=NUM):
  """The three branches and the gated output, float64, from the paper's equations."""
  q, k, v, gates = (np.asarray(x, np.float64) for x in (q, k, v, gates))
  p = {name: np.asarray(x, np.float64) for name, x in params.items()}
  S, G, scale = k.shape[1], N // K, H ** -0.5
  nb = -(-S // LSEL)
  branches = np.zeros((3,) + q.shape[:3] + (v.shape[-1],))
  for b in range(q.shape[0]):
    kc = _phi(k[b], p["compress_pos_k"], p["compress_w1_k"], p["compress_w2_k"])
    vc = _phi(v[b], p["compress_pos_v"], p["compress_w1_v"], p["compress_w2_v"])
    nc = kc.shape[0]
    for t in range(q.shape[1]):
      seen = np.array([(i * D + L <= t + 1) or not causal for i in range(nc)])
      probs = np.zeros((N, nc))
      for n in range(N):
        if seen.any():
          probs[n] = numpy_math.softmax(scale * kc[:, n // G] @ q[b, t, n], where=seen)
          branches[0, b, t, n] = probs[n] @ vc[:, n // G]
      # eq. 9: importance of selection block j = Σ overlap(i, j) / d · p_cmp[i]; eq. 10: group sum.
      imp = np.zeros((N, nb))
      for j in range(nb):
        for i in range(nc):
          overlap = len(set(range(i * D, i * D + L)) & set(range(j * LSEL, (j + 1) * LSEL)))
          imp[:, j] += overlap / D * probs[:, i]
      for n in range(N):
        group = imp[(n // G) * G:(n // G + 1) * G].sum(0)
        own = t // LSEL
        forced = {0, own, own - 1} - {-1}
        cands = [j for j in range(nb) if not causal or j * LSEL <= t]
        ranked = sorted(cands, key=lambda j, g=group, f=forced: (j not in f, -g[j], j))
        chosen = set(ranked[:num_selected]) | forced
        keys = np.array([(j // LSEL) in chosen and (j <= t or not causal) for j in range(S)])
        w = numpy_math.softmax(scale * k[b, :, n // G] @ q[b, t, n], where=keys)
        branches[1, b, t, n] = w @ v[b, :, n // G]
        near = np.abs(np.arange(S) - t) < W
        near &= (np.arange(S) <= t) | (not causal)
        w = numpy_math.softmax(scale * k[b, :, n // G] @ q[b, t, n], where=near)
        branches[2, b, t, n] = w @ v[b, :, n // G]
  return branches, np.einsum("cbtnh,btnc->btnh", branches, gates)


def _fn(causal, implementation, num_selected=NUM):
  return jax.jit(lambda q, k, v, g, p: nsa.native_sparse_attention(
      q, k, v, gates=g, **p, causal=causal, implementation=implementation, compress_stride=D,
      select_block=LSEL, num_selected=num_selected, window=W))


@pytest.mark.parametrize("causal", [True, False])
def test_branches_and_gated_sum_match_numpy_rewrite(causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=1)
  params = _params()
  gates = numpy_math.sigmoid(np.random.default_rng(2).standard_normal((B, T, N, 3))).astype(np.float32)
  branches, want = _nsa_numpy(q, k, v, gates, params, causal=causal)
  one_hot = np.broadcast_to(np.eye(3, dtype=np.float32)[:, None, None, None], (3, B, T, N, 3))
  for impl in ("xla", "reference"):
    fn = _fn(causal, impl)
    np.testing.assert_allclose(fn(q, k, v, gates, params), want, err_msg=impl,
                               **tolerances.output(jnp.float32))
    for c, name in enumerate(("compressed", "selected", "window")):
      np.testing.assert_allclose(fn(q, k, v, one_hot[c], params), branches[c],
                                 err_msg=f"{impl}: {name} branch", **tolerances.output(jnp.float32))


def test_selecting_every_block_makes_the_selected_branch_full_attention():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=3)
  gates = np.broadcast_to(np.array([0, 1, 0], np.float32), (B, T, N, 3))     # selected branch only
  got = _fn(True, "xla", num_selected=-(-T // LSEL))(q, k, v, gates, _params())
  want = inputs.jit_with(flex.flex_attention, mask_mod=lambda b, n, i, j: i >= j,
                        implementation="reference")(q, k, v)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  fewer = _fn(True, "xla")(q, k, v, gates, _params())
  assert tolerances.rel_rms(fewer, want) > tolerances.CHANGED_REL_RMS  # n < nb is sparse


def test_a_gqa_group_shares_one_selection_decided_by_its_summed_scores():
  """Head 0 alone prefers block 1, head 1 alone block 2, but their sum prefers block 1 for the
  group: both heads select block 1. The other group (heads 2, 3) prefers block 2."""
  nc = (T - L) // D + 1
  p = np.zeros((1, N, T, nc), np.float32)
  one, two = 4 // D, 8 // D       # compression blocks starting at 4 (inside block 1) and 8 (block 2)
  p[0, 0, :, one], p[0, 1, :, two], p[0, 1, :, one] = 0.6, 0.5, 0.3
  p[0, 2, :, two], p[0, 3, :, two] = 0.5, 0.5
  selected = np.asarray(inputs.jit_with(nsa.nsa_selection, S=T, K=K, block=L, compress_stride=D,
                                        select_block=LSEL, num_selected=4, causal=False)(p))
  np.testing.assert_array_equal(selected[:, 0], selected[:, 1])
  np.testing.assert_array_equal(selected[:, 2], selected[:, 3])
  t = 18                          # own block 4, local block 3, first block 0: one place by score
  np.testing.assert_array_equal(selected[0, 0, t], [True, True, False, True, True])
  np.testing.assert_array_equal(selected[0, 2, t], [True, False, True, True, True])


def test_rejects_packed_sequences_and_bad_gates():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV)
  kw = dict(**_params(), compress_stride=D, select_block=LSEL, num_selected=NUM, window=W)
  with pytest.raises(ValueError, match="native_sparse_attention.*segment_ids"):
    nsa.native_sparse_attention(q, k, v, gates=jnp.ones((B, T, N, 3)), **kw,
                                segment_ids=jnp.zeros((B, T), jnp.int32))
  with pytest.raises(ValueError, match="native_sparse_attention.*gates"):
    nsa.native_sparse_attention(q, k, v, gates=jnp.ones((B, T, N)), **kw)


@pytest.mark.parametrize("S,l,d,l_sel", [(64, 32, 16, 64), (37, 4, 2, 4), (100, 6, 3, 9),
                                         (50, 5, 3, 7)])
def test_eq9_projection_equals_the_overlap_weights(S, l, d, l_sel):
  """The shifted-sum form (d divides l and l') and the banded form (otherwise) of eq. 9 both equal
  the dense product with the overlap weights."""
  nc = (S - l) // d + 1
  weights = nsa.nsa_selection_weights(nc, S, block=l, stride=d, select_block=l_sel)
  p = np.random.default_rng(0).random((3, nc)).astype(np.float32)
  got = nsa._onto_selection_blocks(jnp.asarray(p), weights, block=l, stride=d, select_block=l_sel)
  np.testing.assert_allclose(np.asarray(got), p @ weights, **tolerances.output(jnp.float32))


def test_causal_bands_of_the_compressed_branch_equal_the_dense_branch():
  """At T = 1024 the compressed branch runs in several query chunks; a causal call at a static
  offset runs them in bands over only the blocks each band's last query sees. Its output and
  gradients equal those of the same call at a traced offset (every chunk over every block)."""
  t = 1024
  q, k, v = inputs.qkv(B=1, T=t, N=N, K=K, H=H, h=HV, seed=4)
  gates = numpy_math.sigmoid(np.random.default_rng(5).standard_normal((1, t, N, 3))).astype(np.float32)

  def loss(q, k, v, params, offset):
    out = nsa.native_sparse_attention(q, k, v, gates=gates, **params, causal=True, q_offset=offset,
                                      compress_stride=D, select_block=LSEL, num_selected=NUM,
                                      window=W)
    return jnp.sum(out * jnp.sin(out)), out

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  (_, banded), banded_grads = jax.jit(lambda *a: grad(*a, 0))(q, k, v, _params())
  (_, dense), dense_grads = jax.jit(grad)(q, k, v, _params(), jnp.int32(0))
  np.testing.assert_allclose(banded, dense, **tolerances.output(jnp.float32))
  for got, want in zip(jax.tree.leaves(banded_grads), jax.tree.leaves(dense_grads), strict=True):
    np.testing.assert_allclose(got, want, **tolerances.grad(jnp.float32))
