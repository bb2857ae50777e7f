"""FlexPrefill (arXiv:2502.20766): each head's pattern is chosen by the sqrt Jensen-Shannon divergence
between a pooled estimate of the last query block's block distribution and its true attention
(query-aware below tau, vertical-slash otherwise), and each pattern keeps the fewest blocks whose
attention mass reaches gamma.

Checked against a float64 numpy rewrite of the paper's selection (last-block attention, vertical and
slash masses, pooled estimate, JS divergence, cumulative-mass covers, tiles) and of the block-sparse
causal attention, per head with GQA, padding and a minimum budget; the claims as tests that can fail:
the kept blocks cover >= gamma of their mass and are the smallest such set (per head: vertical and
slash for vertical-slash heads, the flattened pooled map for query-aware heads), gamma = 1 is full
causal attention, and the divergence switch on hand-built inputs (estimate equal to the true
distribution → query-aware; strongly different → vertical-slash). The fast path's gradients match
the reference's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex
from attnjax.ops.sparse import flexprefill
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, HV = 2, 19, 4, 2, 8, 6
BLOCK = 4
NB = -(-T // BLOCK)
GAMMA = 0.8
IMPLEMENTATIONS = ("xla", "reference")


def _cover(mass, gamma, forced=None, low=1, high=None):
  """Indices of the shortest prefix (forced first, then decreasing mass, ties to the lower index)
  whose cumulative mass reaches gamma of the total, its length clipped to [low, high]."""
  key = mass if forced is None else np.where(forced, np.inf, mass)
  order = np.argsort(-key, kind="stable")
  csum = np.cumsum(mass[order])
  count = int(np.argmax(csum >= gamma * mass.sum())) + 1
  count = min(max(count, low), len(mass) if high is None else high)
  return set(order[:count].tolist())


def _flexprefill_numpy(q, k, v, *, bs, gamma, tau, lengths, low=1):
  """float64 rewrite: (output, selection dict, masses dict) for causal prefill with row lengths."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, n_, h_ = q.shape
  g_ = n_ // k.shape[2]
  nb = -(-t_ // bs)
  scale = h_ ** -0.5
  out = np.zeros((b_, t_, n_, v.shape[-1]))
  sel = {name: np.zeros((b_, n_, nb, nb), bool) for name in ("selected", "query_blocks")}
  sel.update(vertical=np.zeros((b_, n_, nb), bool), slash=np.zeros((b_, n_, nb), bool),
             query_aware=np.zeros((b_, n_), bool), divergence=np.zeros((b_, n_)))
  masses = {name: np.zeros((b_, n_) + shape) for name, shape in
            (("vertical", (nb,)), ("slash", (nb,)), ("map", (nb, nb)))}
  for b in range(b_):
    length = int(lengths[b])
    real_blocks = [j for j in range(nb) if j * bs < length]
    for n in range(n_):
      kk, vv = k[b, :, n // g_], v[b, :, n // g_]
      rows = [p for p in range(length - bs, length) if p >= 0]
      vert, slash = np.zeros(nb), np.zeros(nb)
      for p in rows:
        a = numpy_math.softmax(scale * kk[:p + 1] @ q[b, p, n])
        for j in range(p + 1):
          vert[j // bs] += a[j] / len(rows)
          slash[(p - j) // bs] += a[j] / len(rows)
      k_mean = {j: kk[j * bs:min((j + 1) * bs, length)].mean(0) for j in real_blocks}
      q_mean = q[b, rows, n].mean(0)
      est = np.zeros(nb)
      est[real_blocks] = numpy_math.softmax(np.array([scale * q_mean @ k_mean[j]
                                                      for j in real_blocks]))
      mid = (est + vert) / 2
      js = sum(0.5 * x[j] * np.log(x[j] / mid[j]) for x in (est, vert) for j in range(nb) if x[j] > 0)
      query_aware = np.sqrt(js) < tau
      first = np.arange(nb) == 0
      kept_v = _cover(vert, gamma, first, low, low if query_aware else None)
      kept_s = _cover(slash, gamma, first, low, low if query_aware else None)
      block_map = np.zeros((nb, nb))
      for i in real_blocks:
        qi = q[b, i * bs:min((i + 1) * bs, length), n].mean(0)
        cols = [j for j in real_blocks if j <= i]
        block_map[i, cols] = numpy_math.softmax(np.array([scale * qi @ k_mean[j] for j in cols]))
      kept_map = _cover(block_map.reshape(-1), gamma) if query_aware else set()
      tiles = np.zeros((nb, nb), bool)
      for i in range(nb):
        for j in range(min(i + 1, len(real_blocks))):
          tiles[i, j] = j in kept_v or (i - j) in kept_s or (i * nb + j) in kept_map
      for t in range(t_):
        keys = np.array([j <= t and j < length and tiles[t // bs, j // bs] for j in range(t_)])
        out[b, t, n] = numpy_math.softmax(scale * kk @ q[b, t, n], where=keys) @ vv
      sel["selected"][b, n] = tiles
      sel["query_blocks"][b, n].flat[sorted(kept_map)] = True
      sel["vertical"][b, n, sorted(kept_v)] = True
      sel["slash"][b, n, sorted(kept_s)] = True
      sel["query_aware"][b, n], sel["divergence"][b, n] = query_aware, np.sqrt(js)
      masses["vertical"][b, n], masses["slash"][b, n], masses["map"][b, n] = vert, slash, block_map
  return out, sel, masses


def _case(seed):
  """Inputs, row lengths, and a tau between the heads' divergences (both patterns occur)."""
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=seed)
  lengths = np.array([T, 14])
  _, sel, _ = _flexprefill_numpy(q, k, v, bs=BLOCK, gamma=GAMMA, tau=0.0, lengths=lengths)
  tau = float(np.median(sel["divergence"]))
  return (q, k, v), jnp.asarray(lengths), tau


@pytest.mark.parametrize("min_budget", [None, 2 * BLOCK])
def test_matches_numpy_rewrite(min_budget):
  (q, k, v), lengths, tau = _case(seed=1)
  low = 1 if min_budget is None else min_budget // BLOCK
  want, want_sel, _ = _flexprefill_numpy(q, k, v, bs=BLOCK, gamma=GAMMA, tau=tau, lengths=lengths,
                                         low=low)
  assert want_sel["query_aware"].any() and not want_sel["query_aware"].all()  # both patterns
  kw = dict(block_size=BLOCK, gamma=GAMMA, tau=tau, min_budget=min_budget)

  def run(q, k, v, lengths):  # one compiled program: the selection and both implementations
    return (flexprefill.flexprefill_selection(q, k, kv_lengths=lengths, **kw),
            *(flexprefill.flexprefill_attention(q, k, v, kv_lengths=lengths, **kw,
                                                implementation=impl) for impl in IMPLEMENTATIONS))

  got_sel, *outs = jax.jit(run)(q, k, v, lengths)
  np.testing.assert_allclose(got_sel.divergence, want_sel["divergence"], rtol=1e-4, atol=1e-5)
  for name in ("query_aware", "vertical", "slash", "query_blocks", "selected"):
    np.testing.assert_array_equal(getattr(got_sel, name), want_sel[name], err_msg=name)
  for impl, got in zip(IMPLEMENTATIONS, outs, strict=True):
    # Queries at or past a row's length are padding: not compared.
    for b, length in enumerate(np.asarray(lengths)):
      np.testing.assert_allclose(np.asarray(got)[b, :length], want[b, :length], err_msg=impl,
                                 **tolerances.output(jnp.float32))


def test_kept_blocks_are_the_smallest_set_covering_gamma():
  (q, k, _), lengths, tau = _case(seed=2)
  _, _, masses = _flexprefill_numpy(q, k, k, bs=BLOCK, gamma=GAMMA, tau=tau, lengths=lengths)
  got = inputs.jit_with(flexprefill.flexprefill_selection, block_size=BLOCK, gamma=GAMMA,
                        tau=tau)(q, k, kv_lengths=lengths)
  qa = np.asarray(got.query_aware)
  assert qa.any() and not qa.all()
  first = np.arange(NB) == 0
  for b in range(B):
    for n in range(N):
      if qa[b, n]:
        # One cover over the head's flattened pooled map; nothing is forced.
        sets = [(masses["map"][b, n].reshape(-1), np.asarray(got.query_blocks[b, n]).reshape(-1),
                 np.zeros(NB * NB, bool))]
      else:
        sets = [(masses[name][b, n], np.asarray(getattr(got, name)[b, n]), first)
                for name in ("vertical", "slash")]
      for mass, kept, forced in sets:
        assert kept[forced].all()
        covered = mass[kept].sum()
        assert covered >= GAMMA * mass.sum() - 1e-9, (b, n)
        # Smallest: the best set with one block fewer (the forced ones kept) drops below gamma.
        dropped = mass[kept & ~forced]
        if dropped.size:
          assert covered - dropped.min() < GAMMA * mass.sum(), (b, n)


def test_gamma_one_is_full_causal_attention():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=3)
  want = inputs.jit_with(flex.flex_attention, mask_mod=lambda b, n, i, j: i >= j,
                         implementation="reference")(q, k, v)
  # tau = 0: every head vertical-slash; tau = 1 > sqrt(ln 2): every head query-aware (tau traced:
  # one compiled program for both).
  full = jax.jit(lambda q, k, v, tau: flexprefill.flexprefill_attention(
      q, k, v, block_size=BLOCK, gamma=1.0, tau=tau))
  for tau in (0.0, 1.0):
    np.testing.assert_allclose(full(q, k, v, tau), want, err_msg=f"tau={tau}",
                               **tolerances.output(jnp.float32))
  sparse_out = inputs.jit_with(flexprefill.flexprefill_attention, block_size=BLOCK, gamma=0.5,
                               tau=0.0)(q, k, v)
  assert tolerances.rel_rms(sparse_out, want) > tolerances.CHANGED_REL_RMS  # gamma < 1 is sparse


def test_divergence_switch_on_hand_built_inputs():
  """Head 0: block 2's keys and the last queries point along e0 (the other keys along e1), so both
  the pooled estimate and the true attention put almost all mass on block 2: query-aware. Head 1:
  block 2 alternates +c·e0 / -c·e0 (mean 0) and the other keys are 0, so the estimate is uniform
  while the true attention sits on block 2's +c keys: vertical-slash, keeping block 2 (and block 0,
  forced)."""
  t, h, c = 20, 2, 12.0
  k = np.zeros((1, t, 2, h), np.float32)
  k[0, :, 0, 1] = 1.0
  k[0, 8:12, 0] = [c, 0.0]
  k[0, 8:12, 1, 0] = [c, -c, c, -c]
  q = np.zeros((1, t, 2, h), np.float32)
  q[0, 16:, :, 0] = c
  got = inputs.jit_with(flexprefill.flexprefill_selection, block_size=4, gamma=0.9, tau=0.1)(
      jnp.asarray(q), jnp.asarray(k))
  np.testing.assert_array_equal(got.query_aware[0], [True, False])
  assert got.divergence[0, 0] < 1e-3 and got.divergence[0, 1] > 0.5
  np.testing.assert_array_equal(got.vertical[0, 1], [True, False, True, False, False])
  assert not got.query_blocks[0, 1].any()


def test_fast_path_gradients_match_the_reference():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=4)
  dout = np.random.default_rng(5).standard_normal((B, T, N, HV)).astype(np.float32)
  kw = dict(block_size=BLOCK, gamma=GAMMA, tau=0.1)
  inputs.assert_same_gradients(
      lambda *a: flexprefill.flexprefill_attention(*a, **kw, implementation="xla"),
      lambda *a: flexprefill.flexprefill_attention(*a, **kw, implementation="reference"),
      (q, k, v), dout, ("dq", "dk", "dv"), tol=tolerances.grad(jnp.float32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(causal=False), "causal=True"),
    (dict(segment_ids=jnp.zeros((B, T), jnp.int32)), "segment_ids"),
    (dict(gamma=0.0), "gamma"),
    (dict(block_size=0), "block_size"),
    (dict(min_budget=0), "min_budget"),
])
def test_rejects_bad_calls(kwargs, match):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV)
  with pytest.raises(ValueError, match=f"flexprefill_attention.*{match}"):
    flexprefill.flexprefill_attention(q, k, v, **{"block_size": BLOCK, **kwargs})


def test_rejects_a_call_over_a_kv_cache():
  q, k, v = inputs.qkv(B=B, T=3, S=T, N=N, K=K, H=H, h=HV)
  with pytest.raises(ValueError, match="flexprefill_attention: prefill only"):
    flexprefill.flexprefill_attention(q, k, v, block_size=BLOCK, q_offset=T - 3,
                                      kv_lengths=jnp.full((B,), T))
