"""Each synthetic task's rules, checked row by row against plain-Python readings of the rules."""


import numpy as np
import pytest

from attnjax.data import synthetic


def rows(batch):
  """(inputs, targets, weights) of each example."""
  return zip(batch["inputs"], batch["targets"], batch["weights"], strict=True)


def test_mqar_queries_are_answered_by_the_value_bound_earlier():
  task = synthetic.MQAR(vocab_size=64, seq_len=48, num_kv_pairs=6, seed=4)
  batch = task.batch(0, 32)
  half, context = 32, 12
  for inputs, targets, weights in rows(batch):
    keys, values = inputs[0:context:2], inputs[1:context:2]
    assert len(set(keys)) == 6 and len(set(values)) == 6
    assert ((1 <= keys) & (keys < half)).all() and ((half <= values) & (values < 64)).all()
    bound = dict(zip(keys, values, strict=True))
    (answer_at,) = np.nonzero(weights)
    assert len(answer_at) == 6
    # Queries sit in the two-token slots after the context, one per key.
    assert (answer_at >= context).all() and ((answer_at - context) % 2 == 0).all()
    assert sorted(inputs[answer_at]) == sorted(keys)
    for t in answer_at:
      assert targets[t] == bound[inputs[t]]
      assert inputs[t + 1] == targets[t]  # The value follows its query in the sequence.
    np.testing.assert_array_equal(targets[:-1], inputs[1:])


def test_mqar_without_random_non_queries_leaves_zeros():
  batch = synthetic.MQAR(random_non_queries=False).batch(0, 16)
  for inputs, weights in zip(batch["inputs"], batch["weights"], strict=True):
    used = np.zeros(64, bool)
    used[:16] = True
    (answer_at,) = np.nonzero(weights)
    used[answer_at] = used[answer_at + 1] = True
    assert (inputs[~used] == 0).all() and (inputs[used] != 0).all()


def test_mqar_query_gaps_follow_the_power_law():
  # One pair, so the gap is a single draw from p(g) ∝ a (g + 1)^(a - 1) over 10 slots.
  power_a, slots, rows = 0.3, 10, 20000
  task = synthetic.MQAR(vocab_size=16, seq_len=2 + 2 * slots, num_kv_pairs=1, power_a=power_a)
  weights = task.draw(np.random.default_rng(0), rows)["weights"]
  gaps = (np.argmax(weights, axis=1) - 2) // 2
  observed = np.bincount(gaps, minlength=slots) / rows
  expected = np.arange(1, slots + 1) ** (power_a - 1)
  expected /= expected.sum()
  # Five standard errors of a frequency estimated from `rows` draws.
  np.testing.assert_array_less(np.abs(observed - expected),
                               5 * np.sqrt(expected * (1 - expected) / rows))


@pytest.mark.parametrize("num_noise_tokens", [0, 3])
def test_selective_copy_copies_the_data_tokens_in_order(num_noise_tokens):
  task = synthetic.SelectiveCopy(vocab_size=12, seq_len=40, num_tokens=6,
                                 num_noise_tokens=num_noise_tokens)
  batch = task.batch(1, 32)
  first_data, context = 2 + num_noise_tokens, 34
  for inputs, targets, weights in rows(batch):
    body = inputs[:context]
    data_tokens = body[body >= first_data]
    filler = body[body < first_data]
    assert len(data_tokens) == 6
    if num_noise_tokens:
      assert ((2 <= filler) & (filler < first_data)).all()
    else:
      assert (filler == 0).all()
    assert inputs[context] == 1
    np.testing.assert_array_equal(np.nonzero(weights)[0], np.arange(context, 40))
    np.testing.assert_array_equal(targets[weights == 1], data_tokens)


def test_induction_answer_is_the_token_after_the_first_trigger():
  batch = synthetic.Induction(vocab_size=8, seq_len=32).batch(2, 64)
  positions = []
  for inputs, targets, weights in rows(batch):
    (triggers,) = np.nonzero(inputs == 0)
    assert len(triggers) == 2 and triggers[1] == 31 and triggers[0] <= 29
    np.testing.assert_array_equal(np.nonzero(weights)[0], [31])
    assert targets[31] == inputs[triggers[0] + 1] != 0
    positions.append(triggers[0])
  assert len(set(positions)) > 10  # The trigger moves.


@pytest.mark.parametrize("distinct", [False, True])
def test_sorting_targets_are_the_sorted_tokens(distinct):
  batch = synthetic.Sorting(vocab_size=20, seq_len=16, distinct=distinct).batch(0, 32)
  repeats = 0
  for inputs, targets, weights in rows(batch):
    tokens = inputs[:8]
    assert (tokens >= 1).all() and inputs[8] == 0
    np.testing.assert_array_equal(np.nonzero(weights)[0], np.arange(8, 16))
    np.testing.assert_array_equal(targets[8:], sorted(tokens))
    repeats += len(set(tokens)) < 8
  assert (repeats == 0) if distinct else (repeats > 0)
