"""ListOps: classify the value (0-9) of a nested list-operation expression.

ListOps: A Diagnostic Dataset for Latent Tree Learning (Nangia & Bowman, arXiv:1804.06028), in the
form used by Long Range Arena (Tay et al., arXiv:2011.04006): operators MIN, MAX, MED (the median,
truncated to an integer as `int(np.median)`), SUM_MOD (the sum mod 10) over digits 0-9 and nested
sub-lists, e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]` = 9.

Trees are drawn as LRA draws them: a node at depth < max_depth is an operator with probability 0.25
(else a digit; at max_depth always a digit); an operator takes 2 .. max_args arguments; a tree is
kept when its token count lies in [min_length, seq_len] (LRA keeps 500 < length < 2000; parentheses,
which carry no information, are not emitted). LRA's sizes are seq_len 2000, min_length 500,
max_depth 10, max_args 10; the defaults here are CPU-sized (seq_len 128, min_length 32, max_args 5:
with 10 arguments most draws overflow 128 tokens and generation gets ten times slower).

Token ids (vocabulary 16): 0 is padding (the attention mask is `inputs != PAD`), digits d -> d + 1,
`[MIN` 11, `[MAX` 12, `[MED` 13, `[SM` 14, `]` 15. Sequences are left-aligned and padded to seq_len.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from attnjax.data import base

PAD = 0
MIN, MAX, MED, SUM_MOD, END = 11, 12, 13, 14, 15
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VOCAB_SIZE = 16
NUM_CLASSES = 10
# LRA's probability that a node above max_depth is an operator (its VALUE_P).
OPERATOR_P = 0.25
_NAMES = {MIN: "[MIN", MAX: "[MAX", MED: "[MED", SUM_MOD: "[SM", END: "]"}
_IDS = {name: token for token, name in _NAMES.items()}


def apply_operator(op: int, args: list[int]) -> int:
  """The value of operator token `op` on digit arguments."""
  if op == MIN:
    return min(args)
  if op == MAX:
    return max(args)
  if op == MED:
    return int(np.median(args))
  if op == SUM_MOD:
    return sum(args) % 10
  raise ValueError(f"not an operator token: {op}")


def evaluate(tokens) -> int:
  """The value of one token sequence (padding ignored), with a stack; ValueError if malformed."""
  stack: list[list[int]] = []  # Each frame: [op, arg, arg, ...].
  result = None
  for token in (int(t) for t in tokens if int(t) != PAD):
    if result is not None:
      raise ValueError("tokens after the end of the expression")
    if token in OPERATORS:
      stack.append([token])
      continue
    if 1 <= token <= 10:
      value = token - 1
    elif token == END:
      if not stack or len(stack[-1]) < 2:
        raise ValueError("`]` without an open operator and arguments")
      op, *args = stack.pop()
      value = apply_operator(op, args)
    else:
      raise ValueError(f"unknown token id {token}")
    if stack:
      stack[-1].append(value)
    else:
      result = value
  if result is None or stack:
    raise ValueError("incomplete expression")
  return result


def to_string(tokens) -> str:
  """Readable form of a token sequence, e.g. "[MAX 2 9 [MIN 4 7 ] 0 ]" (padding dropped)."""
  return " ".join(_NAMES.get(int(t), str(int(t) - 1)) for t in tokens if int(t) != PAD)


def encode(text: str) -> list[int]:
  """Token ids of a readable expression (the inverse of `to_string`)."""
  return [_IDS[word] if word in _IDS else int(word) + 1 for word in text.split()]


class _TooLong(Exception):
  pass


def _max_length(depth: int, max_depth: int, max_args: int) -> int:
  """The most tokens a tree rooted at `depth` can have."""
  if depth >= max_depth:
    return 1
  return max(1, 2 + max_args * _max_length(depth + 1, max_depth, max_args))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ListOps(base.GeneratedTask):
  """ListOps classification ("classify", 10 classes); see the module docstring for the rules."""
  name = "listops"
  seq_len: int = 128
  min_length: int = 32
  max_depth: int = 10
  max_args: int = 5

  def __post_init__(self):
    super().__post_init__()
    base.check_int("seq_len", self.seq_len, minimum=4)
    base.check_int("max_depth", self.max_depth, minimum=2)
    base.check_int("max_args", self.max_args, minimum=2)
    base.check_int("min_length", self.min_length, minimum=1, maximum=self.seq_len)
    longest = _max_length(1, self.max_depth, self.max_args)
    if self.min_length > longest:
      raise base.config_error("min_length", self.min_length,
                              f"no tree with max_depth={self.max_depth}, max_args={self.max_args} "
                              f"has more than {longest} tokens")

  @property
  def spec(self) -> base.TaskSpec:
    return base.TaskSpec(name=self.name, kind="classify", input_shape=(self.seq_len,),
                         input_dtype="int32", vocab_size=VOCAB_SIZE, num_classes=NUM_CLASSES,
                         seq_len=self.seq_len)

  def _tree(self, py_rng: random.Random, depth: int, out: list[int]) -> int:
    """Appends one tree's tokens to `out` and returns its value; _TooLong past seq_len tokens."""
    if depth >= self.max_depth or py_rng.random() >= OPERATOR_P:
      value = py_rng.randrange(10)
      out.append(value + 1)
      return value
    op_at = len(out)
    out.append(PAD)  # The operator is drawn after its arguments, as in LRA; filled in below.
    args = [self._tree(py_rng, depth + 1, out) for _ in range(py_rng.randint(2, self.max_args))]
    op = OPERATORS[py_rng.randrange(len(OPERATORS))]
    out[op_at] = op
    out.append(END)
    if len(out) > self.seq_len:
      raise _TooLong
    return apply_operator(op, args)

  def draw(self, rng, n):
    # Python's generator is much faster than numpy's for one draw at a time; seeding it from the
    # step generator keeps the batch a pure function of (seed, split, step).
    py_rng = random.Random(int(rng.integers(2**63)))
    inputs = np.zeros((n, self.seq_len), np.int32)
    labels = np.zeros(n, np.int32)
    made = 0
    while made < n:
      tokens: list[int] = []
      try:
        value = self._tree(py_rng, 1, tokens)
      except _TooLong:
        continue
      if len(tokens) < self.min_length:
        continue
      inputs[made, :len(tokens)] = tokens
      labels[made] = value
      made += 1
    return {"inputs": inputs, "targets": labels, "weights": np.ones(n, np.float32)}
