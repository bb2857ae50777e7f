"""Hard attention (#203): unique and average hard attention checked against a float64 loop rewrite,
their tie rules (leftmost maximum / uniform over ties), and a formal-language probe from the paper's
setting: with hand-set weights one hard-attention layer decides "the string contains an `a`" and
finds the position of its leftmost `a`, exactly, at every length."""

import jax.numpy as jnp
import numpy as np
import pytest

import attnjax.ops.theory  # noqa: F401  (registers the mechanism until attnjax.ops imports it)
from attnjax.ops.theory import hard_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _hard_loop(q, k, v, *, causal, scale, mode):
  """Explicit loops over b, n, t in float64; ties are exact equality of the float32 scores."""
  q, k, v = (np.asarray(x) for x in (q, k, v))
  B, T, N, _ = q.shape
  S, K, h = v.shape[1], v.shape[2], v.shape[3]
  out = np.zeros((B, T, N, h))
  for b in range(B):
    for n in range(N):
      kh = n // (N // K)
      for t in range(T):
        keys = range(t + 1) if causal else range(S)
        # float32 scores as the mechanism forms them, so exact ties are the same ties.
        s = [np.float32(np.dot(q[b, t, n], k[b, j, kh]) * np.float32(scale)) for j in keys]
        best = max(s)
        tied = [j for j, x in zip(keys, s, strict=True) if x == best]
        chosen = tied[:1] if mode == "unique" else tied
        for j in chosen:
          out[b, t, n] += np.asarray(v[b, j, kh], np.float64) / len(chosen)
  return out


@pytest.mark.parametrize("mode", ["unique", "average"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_loop_rewrite(mode, causal):
  q, k, v = inputs.qkv(B=2, T=7, N=4, K=2, H=4, h=3, seed=11)
  out = inputs.jit_with(hard_attention, causal=causal, scale=0.5, mode=mode)(q, k, v)
  want = _hard_loop(q, k, v, causal=causal, scale=0.5, mode=mode)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def _tied_keys():
  # Keys 1, 3 and 4 tie at the maximal score 2 for the query [1, 0]; key 0 scores 1, key 2 scores -1.
  q = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
  k = jnp.array([[1.0, 0.0], [2.0, 1.0], [-1.0, 0.0], [2.0, -3.0], [2.0, 0.0]]).reshape(1, 5, 1, 2)
  v = jnp.eye(5).reshape(1, 5, 1, 5)  # one-hot values: the output is the weight row
  return q, k, v


def test_unique_puts_all_weight_on_the_leftmost_tie():
  q, k, v = _tied_keys()
  w = np.asarray(hard_attention(q, k, v, scale=1.0, mode="unique"))[0, 0, 0]
  np.testing.assert_array_equal(w, [0.0, 1.0, 0.0, 0.0, 0.0])


def test_average_is_uniform_over_the_ties():
  q, k, v = _tied_keys()
  w = np.asarray(hard_attention(q, k, v, scale=1.0, mode="average"))[0, 0, 0]
  np.testing.assert_allclose(w, [0.0, 1 / 3, 0.0, 1 / 3, 1 / 3], **F32)


def test_masked_keys_never_win_and_empty_rows_give_zero():
  q, k, v = _tied_keys()
  # Only keys 0 and 2 are visible (lengths): key 0 (score 1) wins over key 2 (score -1).
  w = np.asarray(hard_attention(q, k, v, scale=1.0, kv_lengths=jnp.array([1])))[0, 0, 0]
  np.testing.assert_array_equal(w, [1.0, 0.0, 0.0, 0.0, 0.0])
  w = np.asarray(hard_attention(q, k, v, scale=1.0, kv_lengths=jnp.array([0]), mode="average"))
  np.testing.assert_array_equal(w, 0.0)


def _has_a_probe(strings, mode):
  """One hard-attention head with hand-set weights over the alphabet {a, b}.

  Token embedding x_j = [is_a, 1]; every query is [1, 0] and key j is [is_a_j, 0], so the score is
  is_a_j: the maximal keys are the a's when there is one, else all keys tie. The value is
  [is_a_j, j]; unique hard attention then returns [1, leftmost a] or [0, 0] for "no a" (leftmost of
  the all-b tie is position 0); average hard attention returns the fraction of a's among the tied
  keys, i.e. 1 iff the string contains an a.
  """
  T = len(strings[0])
  is_a = jnp.array([[c == "a" for c in s] for s in strings], jnp.float32)  # [B, T]
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.float32), is_a.shape)
  q = jnp.broadcast_to(jnp.array([1.0, 0.0]), (*is_a.shape, 2))[:, :, None]
  k = jnp.stack([is_a, jnp.zeros_like(is_a)], -1)[:, :, None]
  v = jnp.stack([is_a, pos], -1)[:, :, None]
  return np.asarray(hard_attention(q, k, v, scale=1.0, mode=mode))[:, 0, 0]


@pytest.mark.parametrize("T", [1, 4, 9])
def test_formal_language_probe_exists_a_and_leftmost_a(T):
  rng = np.random.default_rng(T)
  strings = ["".join(rng.choice(["a", "b"], size=T, p=[0.2, 0.8])) for _ in range(16)]
  strings += ["b" * T, "a" * T, "b" * (T - 1) + "a"]
  for mode in ("unique", "average"):
    out = _has_a_probe(strings, mode)
    has_a = np.array(["a" in s for s in strings], np.float64)
    # The decision "contains an a" is exact in both modes (output 1.0 or 0.0, no rounding).
    np.testing.assert_array_equal(out[:, 0], has_a)
    if mode == "unique":
      leftmost = np.array([s.index("a") if "a" in s else 0 for s in strings], np.float64)
      np.testing.assert_array_equal(out[:, 1], leftmost)


def test_rejects_unknown_mode():
  q, k, v = _tied_keys()
  with pytest.raises(ValueError, match="hard_attention: `mode`"):
    hard_attention(q, k, v, mode="soft")
