"""Round Attention (#4): the rounds a query keeps are the top-k by the paper's round score (the full
attention weight each earlier round gets, summed over heads: per query, or over a question's queries
for `select_rounds`), checked against an explicit-loop float64 rewrite together with the attention
over the kept rounds; with k at least the number of rounds it is full attention; the keys and values
of rounds it did not keep do not reach the output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import MultiHeadAttention
from attnjax.ops.decode import round_attention, select_rounds
from attnjax.ops.softmax import softmax_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
# Eleven cached tokens in four rounds (two per batch row, the second not contiguous); the last
# round is the one being decoded in the cache tests.
ROUNDS = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3],
                   [0, 0, 1, 1, 1, 0, 2, 2, 3, 3, 3]], np.int32)


def _weights64(q, k, b, t, visible):
  """Float64 softmax weights `[N, S]` of query t of row b over its visible keys."""
  G = q.shape[2] // k.shape[2]
  out = np.zeros((q.shape[2], k.shape[1]))
  for n in range(q.shape[2]):
    s = np.array([q[b, t, n] @ k[b, j, n // G] for j in range(k.shape[1])]) / np.sqrt(q.shape[3])
    e = np.where(visible, np.exp(s - s[visible].max()), 0.0)
    out[n] = e / e.sum()
  return out


def _visible(S, pos, causal, length):
  return (np.arange(S) < length) & ((np.arange(S) <= pos) if causal else True)


def _round_scores64(q, k, rounds, b, t, *, causal, q_offset, length):
  """The paper's qAtt_r of query t of row b: {history round: Σ_n Σ_{j ∈ r} w_n(t, j)}."""
  S = k.shape[1]
  pos = q_offset + t
  visible = _visible(S, pos, causal, length)
  w = _weights64(q, k, b, t, visible).sum(0)
  scores = {}
  for j in np.flatnonzero(visible):
    if rounds[b, j] != rounds[b, pos]:
      scores[int(rounds[b, j])] = scores.get(int(rounds[b, j]), 0.0) + w[j]
  return scores


def _top(scores, top_k):
  return sorted(scores, key=lambda r: (-scores[r], r))[:top_k]


def _round_attention64(q, k, v, rounds, *, top_k, causal, q_offset=0, lengths=None, chosen=None):
  """Explicit loops in float64: each query keeps its own round and the top-k history rounds (or the
  rounds in `chosen[b]`), then softmax attention over the kept visible keys."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, _ = q.shape
  S, G = k.shape[1], q.shape[2] // k.shape[2]
  out = np.zeros((B, T, N, v.shape[3]))
  for b in range(B):
    length = S if lengths is None else lengths[b]
    for t in range(T):
      pos = q_offset + t
      if chosen is None:
        keep = _top(_round_scores64(q, k, rounds, b, t, causal=causal, q_offset=q_offset,
                                    length=length), top_k)
      else:
        keep = list(chosen[b])
      kept = np.isin(rounds[b], keep + [rounds[b, pos]]) & _visible(S, pos, causal, length)
      w = _weights64(q, k, b, t, kept)
      for n in range(N):
        out[b, t, n] = w[n] @ v[b, :, n // G]
  return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_each_query_keeps_its_top_k_rounds_by_the_papers_score(causal, top_k):
  q, k, v = inputs.qkv(B=2, T=11, N=4, K=2, H=8, h=6, seed=1)
  got = inputs.jit_with(round_attention, causal=causal, top_k_rounds=top_k)(
      q, k, v, round_ids=ROUNDS)
  want = _round_attention64(q, k, v, ROUNDS, top_k=top_k, causal=causal)
  np.testing.assert_allclose(np.asarray(got), want, **F32)
  # The selection matters at these sizes: it is not full attention.
  assert tolerances.rel_rms(got, softmax_attention(q, k, v, causal=causal)) > (
      tolerances.CHANGED_REL_RMS)


def test_a_decode_block_over_a_cache_keeps_its_top_k_rounds():
  q, k, v = inputs.qkv(B=2, T=2, S=11, N=4, K=2, H=8, h=6, seed=2)
  lengths = np.array([10, 10], np.int32)
  got = round_attention(q, k, v, round_ids=ROUNDS, causal=True, q_offset=8, kv_lengths=lengths,
                        top_k_rounds=1)
  want = _round_attention64(q, k, v, ROUNDS, top_k=1, causal=True, q_offset=8, lengths=lengths)
  np.testing.assert_allclose(np.asarray(got), want, **F32)


@pytest.mark.parametrize("causal", [False, True])
def test_keeping_every_round_is_full_attention(causal):
  q, k, v = inputs.qkv(B=2, T=11, N=4, K=2, H=8, h=6, seed=3)
  got = round_attention(q, k, v, round_ids=ROUNDS, causal=causal, top_k_rounds=11)
  np.testing.assert_allclose(np.asarray(got), np.asarray(softmax_attention(q, k, v, causal=causal)),
                             **F32)


def test_select_rounds_is_the_top_k_of_the_questions_round_scores():
  # A question of three tokens at positions 8-10 (round 3) over the dialogue so far.
  q, k, _ = inputs.qkv(B=2, T=3, S=11, N=4, K=2, H=8, seed=4)
  chosen = np.asarray(select_rounds(q, k, ROUNDS, 2, causal=True, q_offset=8))
  q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
  for b in range(2):
    total = {}
    for t in range(3):
      for r, s in _round_scores64(q64, k64, ROUNDS, b, t, causal=True, q_offset=8,
                                  length=11).items():
        total[r] = total.get(r, 0.0) + s
    assert list(chosen[b]) == _top(total, 2)
  # More slots than history rounds: the rest are empty (-1).
  padded = np.asarray(select_rounds(q, k, ROUNDS, 5, causal=True, q_offset=8))
  np.testing.assert_array_equal(padded[:, :3], np.asarray(select_rounds(q, k, ROUNDS, 3,
                                                                        causal=True, q_offset=8)))
  np.testing.assert_array_equal(padded[:, 3:], -1)


def test_keys_and_values_of_rounds_not_kept_do_not_matter():
  q, k, v = inputs.qkv(B=2, T=3, S=11, N=4, K=2, H=8, h=6, seed=5)
  contract = dict(causal=True, q_offset=8)
  chosen = np.array([[1], [0]], np.int32)                 # the watershed's choice, per sequence
  base = round_attention(q, k, v, round_ids=ROUNDS, selected_rounds=chosen, **contract)
  want = _round_attention64(q, k, v, ROUNDS, top_k=None, causal=True, q_offset=8, chosen=chosen)
  np.testing.assert_allclose(np.asarray(base), want, **F32)
  dropped = ~np.isin(ROUNDS, [3]) & (ROUNDS != chosen)      # neither kept nor the current round
  noise = 10.0 * np.asarray(inputs.qkv(B=2, T=1, S=11, N=4, K=2, H=8, h=6, seed=6)[1])
  k2 = np.where(dropped[..., None, None], noise, k)
  v2 = np.where(dropped[..., None, None], noise[..., :6], v)
  moved = round_attention(q, k2, v2, round_ids=ROUNDS, selected_rounds=chosen, **contract)
  np.testing.assert_allclose(np.asarray(moved), np.asarray(base), **F32)
  # A kept round's values do reach the output.
  kept = np.where((ROUNDS == chosen)[..., None, None], v + 3.0, v)
  assert tolerances.rel_rms(round_attention(q, k, kept, round_ids=ROUNDS, selected_rounds=chosen,
                                            **contract), base) > tolerances.STRONG_CHANGE_REL_RMS
  # Scoring by itself, a query reads the keys of every round (to rank them) but the values of the
  # kept ones only.
  scored = round_attention(q, k, v, round_ids=ROUNDS, top_k_rounds=1, **contract)
  per_query = _round_attention64(q, k, v, ROUNDS, top_k=1, causal=True, q_offset=8)
  np.testing.assert_allclose(np.asarray(scored), per_query, **F32)
  kept_rounds = [[_top(_round_scores64(np.asarray(q, np.float64), np.asarray(k, np.float64),
                                       ROUNDS, b, t, causal=True, q_offset=8, length=11), 1)[0]
                  for t in range(3)] for b in range(2)]
  unread_rows = [b for b in range(2) if not np.isin(ROUNDS[b], kept_rounds[b] + [3]).all()]
  assert unread_rows   # some round of some row is kept by none of its queries
  for b in unread_rows:
    unread = ~np.isin(ROUNDS[b], kept_rounds[b] + [3])
    v2 = np.asarray(v).copy()
    v2[b, unread] = 100.0
    np.testing.assert_allclose(
        np.asarray(round_attention(q, k, v2, round_ids=ROUNDS, top_k_rounds=1, **contract)),
        np.asarray(scored), **F32)


def test_the_layer_caches_round_ids_and_decodes_as_the_full_forward():
  B, T, D = 2, 11, 16
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, mechanism="round_attention",
                             mechanism_kwargs={"top_k_rounds": 1}, causal=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  variables = layer.init(jax.random.PRNGKey(1), x, round_ids=ROUNDS)
  full = layer.apply(variables, x, round_ids=ROUNDS)
  cache = layer.init(jax.random.PRNGKey(1), x, round_ids=ROUNDS, decode=True)["cache"]
  prefill = 8
  step = jax.jit(lambda cache, x, ids: layer.apply({**variables, "cache": cache}, x, decode=True,
                                                   round_ids=ids, mutable=["cache"]))
  out, mutated = step(cache, x[:, :prefill], ROUNDS[:, :prefill])
  outs = [out]
  for t in range(prefill, T):
    out, mutated = step(mutated["cache"], x[:, t:t + 1], ROUNDS[:, t:t + 1])
    outs.append(out)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full), **F32)


def test_bad_arguments_are_clear_errors():
  q, k, v = inputs.qkv(B=2, T=11, N=4, K=2, H=8, h=6)
  with pytest.raises(ValueError, match="round_attention: give `top_k_rounds`"):
    round_attention(q, k, v, round_ids=ROUNDS)
  with pytest.raises(ValueError, match=r"round_attention: `round_ids` must have shape \[B, S\]"):
    round_attention(q, k, v, round_ids=ROUNDS[:, :5], top_k_rounds=1)
  with pytest.raises(ValueError, match=r"round_attention: `selected_rounds` must have shape"):
    round_attention(q, k, v, round_ids=ROUNDS, selected_rounds=np.zeros((3, 1), np.int32))
  with pytest.raises(ValueError, match="round_attention: `top_k_rounds` must be an int >= 1"):
    round_attention(q, k, v, round_ids=ROUNDS, top_k_rounds=0)
