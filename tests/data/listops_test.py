"""ListOps: the evaluator on hand-written expressions, and generated labels against an independent
recursive evaluator written here from the rules (not from attnjax's code)."""

import numpy as np
import pytest

from attnjax.data import listops


def parse(words):
  """Recursive descent over readable words -> (nested ("OP", [args]) / int tree, words used)."""
  if words[0].startswith("["):
    args, at = [], 1
    while words[at] != "]":
      arg, used = parse(words[at:])
      args.append(arg)
      at += used
    return (words[0][1:], args), at + 1
  return int(words[0]), 1


def value(tree):
  if isinstance(tree, int):
    return tree
  op, args = tree
  xs = sorted(value(a) for a in args)
  if op == "MIN":
    return xs[0]
  if op == "MAX":
    return xs[-1]
  if op == "SM":
    return sum(xs) % 10
  assert op == "MED"
  mid = len(xs) // 2
  # The median of an even count is the mean of the middle two, truncated (LRA's int(np.median)).
  return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) // 2


def depth(tree):
  return 1 if isinstance(tree, int) else 1 + max(depth(a) for a in tree[1])


def operator_arg_counts(tree):
  if isinstance(tree, int):
    return []
  return [len(tree[1])] + [n for a in tree[1] for n in operator_arg_counts(a)]


@pytest.mark.parametrize("text, expected", [
    ("7", 7),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 8 ]", 3),
    ("[SM 5 6 7 ]", 8),
    ("[MED 3 9 1 ]", 3),
    ("[MED 1 2 3 4 ]", 2),
    ("[MED 4 7 ]", 5),
    ("[MIN [MAX 1 8 ] [SM 9 9 ] 5 ]", 5),
    ("[SM [MED 0 0 9 ] [MAX 3 [MIN 7 6 ] ] 9 ]", 5),
])
def test_evaluate_hand_written(text, expected):
  tokens = listops.encode(text)
  assert listops.evaluate(tokens) == expected
  assert listops.evaluate(tokens + [listops.PAD] * 5) == expected
  assert listops.to_string(tokens) == text


@pytest.mark.parametrize("text", ["[MAX 2 9", "[MIN ]", "2 3", "]", "[SM [MAX 1 2 ] ] ]"])
def test_evaluate_rejects_malformed(text):
  with pytest.raises(ValueError):
    listops.evaluate(listops.encode(text))


def test_generated_labels_and_limits():
  task = listops.ListOps(seq_len=96, min_length=20, max_depth=5, max_args=4, seed=2)
  batch = task.batch(0, 48)
  for inputs, label in zip(batch["inputs"], batch["targets"], strict=True):
    length = int((inputs != listops.PAD).sum())
    assert 20 <= length <= 96
    assert (inputs[length:] == listops.PAD).all()  # Left-aligned, padded at the end only.
    tree, used = parse(listops.to_string(inputs).split())
    assert used == length
    assert label == value(tree) == listops.evaluate(inputs)
    assert depth(tree) <= 5
    assert all(2 <= n <= 4 for n in operator_arg_counts(tree))
  assert len(np.unique(batch["targets"])) >= 5
  np.testing.assert_array_equal(batch["weights"], 1.0)


def test_all_operators_appear():
  inputs = listops.ListOps(seq_len=64, min_length=16).batch(0, 32)["inputs"]
  for op in listops.OPERATORS:
    assert (inputs == op).any()
