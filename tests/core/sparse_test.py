"""attnjax/core/sparse.py: data-dependent block selection, each stage against numpy.

pool_blocks (mean / max over each block's real tokens), block_scores (per token and per query block,
GQA, share_gqa), candidate_blocks (causal, padding, q_offset), top_k_blocks (the k best candidates
plus `always`), selection_mask (visits exactly the selected tiles; its mask is the selection AND the
call contract), select_blocks (every block selected is exactly full attention under the contract),
token_top_k + gather_tokens (top_k = S is full attention; top_k < S a dense softmax over the kept
keys); gradients finite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import block_mask as bm
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core import sparse
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, S, N, K, H, HV = 2, 13, 13, 4, 2, 8, 6
BS = 4
NB = -(-S // BS)


def test_pool_blocks_mean_and_max_exclude_padding():
  x = np.random.default_rng(0).standard_normal((B, S, K, H)).astype(np.float32)
  lengths = np.array([S, 6])
  for pool in ("mean", "max"):
    got = np.asarray(sparse.pool_blocks(jnp.asarray(x), BS, pool=pool, lengths=jnp.asarray(lengths)))
    want = np.zeros((B, NB, K, H))
    for b in range(B):
      for j in range(NB):
        part = x[b, j * BS:min((j + 1) * BS, lengths[b])]
        if len(part):
          want[b, j] = part.mean(0) if pool == "mean" else part.max(0)
    np.testing.assert_allclose(got, want, err_msg=pool, **tolerances.output(jnp.float32))


@pytest.mark.parametrize("q_block,share_gqa", [(1, False), (1, True), (3, False)])
def test_block_scores_gqa(q_block, share_gqa):
  rng = np.random.default_rng(1)
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  kb = rng.standard_normal((B, NB, K, H)).astype(np.float32)
  got = np.asarray(sparse.block_scores(jnp.asarray(q), jnp.asarray(kb), q_block=q_block,
                                       share_gqa=share_gqa))
  U, G = -(-T // q_block), N // K
  units = np.stack([q[:, u * q_block:(u + 1) * q_block].mean(1) for u in range(U)], 1)  # [B,U,N,H]
  want = np.einsum("bunh,bjnh->bnuj", units, np.repeat(kb, G, axis=2)) * H ** -0.5
  if share_gqa:
    want = np.repeat(want.reshape(B, K, G, U, NB).sum(2), G, axis=1)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))


def test_candidate_blocks_causal_padding_and_offset():
  lengths, offset = np.array([S, 7]), np.array([0, 5])
  got = np.asarray(sparse.candidate_blocks(B=B, T=T, S=S, q_block=2, block_size=BS, causal=True,
                                           q_offset=jnp.asarray(offset),
                                           kv_lengths=jnp.asarray(lengths)))
  U = -(-T // 2)
  want = np.zeros((B, 1, U, NB), bool)
  for b in range(B):
    for u in range(U):
      last = offset[b] + min(2 * u + 1, T - 1)
      for j in range(NB):
        want[b, 0, u, j] = j * BS <= last and j * BS < lengths[b]
  np.testing.assert_array_equal(got, want)


def test_top_k_blocks_picks_the_k_largest_candidates_plus_always():
  rng = np.random.default_rng(2)
  scores = rng.standard_normal((B, N, T, NB)).astype(np.float32)
  candidates = rng.random((B, 1, T, NB)) < 0.7
  always = np.zeros((B, 1, T, NB), bool)
  always[..., 0] = True
  got = np.asarray(sparse.top_k_blocks(jnp.asarray(scores), 2, candidates=jnp.asarray(candidates),
                                       always=jnp.asarray(always)))
  for b, n, t in np.ndindex(B, N, T):
    cand = np.flatnonzero(candidates[b, 0, t])
    best = set(cand[np.argsort(-scores[b, n, t, cand])][:2])
    want = (best | ({0} if candidates[b, 0, t, 0] else set()))
    assert set(np.flatnonzero(got[b, n, t])) == want, (b, n, t)


def test_selection_mask_visits_exactly_the_selected_tiles():
  rng = np.random.default_rng(3)
  q_block, tile_q = 2, 4
  U = -(-T // q_block)
  selected = rng.random((B, N, U, NB)) < 0.4
  base = contract.contract_mask(B=B, T=T, S=S, causal=True)
  block_mask, mask_mod = sparse.selection_mask(jnp.asarray(selected), T=T, S=S, q_block=q_block,
                                               block_size=BS, base_mask=base, tile_q=tile_q)
  nq = -(-T // tile_q)
  padded = np.pad(selected, ((0, 0), (0, 0), (0, nq * 2 - U), (0, 0)))
  visit = padded.reshape(B, N, nq, 2, NB).any(3)
  np.testing.assert_array_equal(np.asarray(block_mask.classes()),
                                np.where(visit, bm.PARTIAL, bm.EMPTY))
  dense_sel = np.repeat(np.repeat(selected, q_block, 2)[:, :, :T], BS, 3)[..., :S]
  want = dense_sel & numpy_math.visible(B, T, S, causal=True)
  np.testing.assert_array_equal(np.asarray(masks.evaluate_mask(mask_mod, B, N, T, S)), want)
  np.testing.assert_array_equal(np.asarray(block_mask.to_dense()), want)


def _full(q, k, v, mask):
  return inputs.jit_with(flex.flex_attention, implementation="reference", mask_mod=mask)(q, k, v)


@pytest.mark.parametrize("case", ["plain", "causal_gqa_lengths", "segments", "offset"])
def test_select_blocks_with_every_block_is_full_attention(case):
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=HV, seed=4)
  kw = dict(causal=case != "plain")
  if case == "causal_gqa_lengths":
    kw["kv_lengths"] = jnp.array([S, 9])
  if case == "segments":
    kw["segment_ids"] = jnp.asarray(np.repeat([[0] * 5 + [1] * 8], B, 0))
  if case == "offset":       # the last 5 queries over a cache of S keys
    q, kw["q_offset"], kw["kv_lengths"] = q[:, -5:], jnp.array([S - 5, S - 6]), jnp.array([S, S - 1])
  def run(q, k, v, implementation):
    block_mask, mask_mod, selected = sparse.select_blocks(q, k, block_size=BS, top_k=NB, **kw)
    out = flex.flex_attention(q, k, v, block_mask=block_mask, implementation=implementation)
    by_mask = flex.flex_attention(q, k, v, mask_mod=mask_mod, implementation="reference")
    return out, by_mask, selected

  base = contract.contract_mask(B=B, T=q.shape[1], S=S, **kw)
  want = _full(q, k, v, base)
  for impl in ("xla", "reference"):
    got, by_mask, selected = jax.jit(run, static_argnums=3)(q, k, v, impl)
    assert np.asarray(selected).shape[-1] == NB
    np.testing.assert_allclose(got, want, err_msg=impl, **tolerances.output(jnp.float32))
    np.testing.assert_allclose(by_mask, want, **tolerances.output(jnp.float32))


def test_select_blocks_gradients_finite():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=HV, seed=5)

  def loss(q, k, v):
    block_mask, _, _ = sparse.select_blocks(q, k, block_size=BS, top_k=1, causal=True,
                                            kv_lengths=jnp.array([S, 3]))
    return jnp.sum(flex.flex_attention(q, k, v, block_mask=block_mask, implementation="xla") ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_token_top_k_and_gather_tokens():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=HV, seed=6)
  scores = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, axis=2))
  visible = jnp.asarray(numpy_math.visible(B, T, S, causal=True))

  def run(q, k, v, top_k):
    idx, valid = sparse.token_top_k(scores, top_k, visible=visible)
    return sparse.gather_tokens(q, k, v, idx, valid)

  full = _full(q, k, v, lambda b, n, i, j: i >= j)
  np.testing.assert_allclose(jax.jit(run, static_argnums=3)(q, k, v, S), full,
                             **tolerances.output(jnp.float32))
  top_k = 3
  got = np.asarray(jax.jit(run, static_argnums=3)(q, k, v, top_k))
  s = np.asarray(scores, np.float64)
  keep = np.zeros(s.shape, bool)
  for b, n, t in np.ndindex(B, N, T):
    seen = np.flatnonzero(np.asarray(visible)[b, 0, t])
    keep[b, n, t, seen[np.argsort(-s[b, n, t, seen])][:top_k]] = True
  w = numpy_math.softmax(s * H ** -0.5, where=keep)
  want = np.einsum("bnts,bsnh->btnh", w, np.repeat(np.asarray(v, np.float64), N // K, axis=2))
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a, top_k) ** 2), argnums=(0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
