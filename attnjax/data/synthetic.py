"""Synthetic sequence tasks: MQAR, selective copying, induction heads and sorting.

All four are next-token tasks ("lm"): each example is a token sequence `s` of length T + 1, the
model sees `inputs = s[:T]` and predicts `targets = s[1:]`, and `weights` is 1 only at the positions
whose next token the task defines (the answers); elsewhere the targets are the sequence's own next
tokens, left for a caller who wants to see them, and weigh nothing. Every generator is vectorised
over the batch with numpy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnjax.data import base


def _lm_spec(name: str, seq_len: int, vocab_size: int) -> base.TaskSpec:
  return base.TaskSpec(name=name, kind="lm", input_shape=(seq_len,), input_dtype="int32",
                       vocab_size=vocab_size, num_classes=vocab_size, seq_len=seq_len)


def _lm_example(seq: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
  """`seq [n, T+1]` and answer `weights [n, T]` -> the batch dict of an "lm" task."""
  return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
          "weights": weights.astype(np.float32)}


def _choose_distinct(rng: np.random.Generator, n: int, population: int, k: int) -> np.ndarray:
  """`[n, k]` int64: k distinct values of range(population) per row, in random order."""
  return np.argsort(rng.random((n, population)), axis=1)[:, :k]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MQAR(base.GeneratedTask):
  """Multi-query associative recall, with Zoology's rules.

  Zoology: Measuring and Improving Recall in Efficient Language Models (Arora et al.,
  arXiv:2312.04927). Keys come from the first half of the vocabulary (`1 .. V/2 - 1`) and values
  from the second half (`V/2 .. V - 1`), both drawn without replacement. The sequence opens with the
  `num_kv_pairs` pairs `k_1 v_1 k_2 v_2 ...`; the rest of the sequence holds
  `(T - 2 * num_kv_pairs) // 2` two-token slots and each key is queried once, in the slot at gap g
  (g = 0 .. slots - 1, drawn without replacement with p(g) ∝ a (g + 1)^(a - 1), a = `power_a`), as
  `k_i v_i`. The answers are the value tokens: weight 1 at each query key's position, whose target
  is the value bound to that key. Other tokens are uniform over the vocabulary when
  `random_non_queries` (Zoology's default) and 0 otherwise.
  """
  name = "mqar"
  vocab_size: int = 256
  seq_len: int = 64
  num_kv_pairs: int = 8
  power_a: float = 0.01
  random_non_queries: bool = True

  def __post_init__(self):
    super().__post_init__()
    base.check_int("vocab_size", self.vocab_size, minimum=4)
    base.check_int("num_kv_pairs", self.num_kv_pairs, minimum=1,
                   maximum=self.vocab_size // 2 - 1)
    base.check_int("seq_len", self.seq_len, minimum=4 * self.num_kv_pairs)
    base.check_float("power_a", self.power_a, low=0.0, high=1.0, low_open=True)
    base.check_bool("random_non_queries", self.random_non_queries)

  @property
  def spec(self) -> base.TaskSpec:
    return _lm_spec(self.name, self.seq_len, self.vocab_size)

  def draw(self, rng, n):
    v, t, k = self.vocab_size, self.seq_len, self.num_kv_pairs
    half = v // 2
    keys = _choose_distinct(rng, n, half - 1, k) + 1
    values = _choose_distinct(rng, n, v - half, k) + half
    context = 2 * k
    slots = (t - context) // 2
    # Gumbel top-k draws k distinct gaps with the law of successive weighted draws without
    # replacement (numpy's choice(replace=False, p=...), as Zoology does), vectorised.
    log_p = (self.power_a - 1.0) * np.log(np.arange(1, slots + 1))
    gaps = np.argsort(-(log_p + rng.gumbel(size=(n, slots))), axis=1)[:, :k]
    if self.random_non_queries:
      seq = rng.integers(0, v, size=(n, t + 1))
    else:
      seq = np.zeros((n, t + 1), np.int64)
    seq[:, 0:context:2] = keys
    seq[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    np.put_along_axis(seq, query_pos, keys, axis=1)
    np.put_along_axis(seq, query_pos + 1, values, axis=1)
    weights = np.zeros((n, t), np.float32)
    np.put_along_axis(weights, query_pos, 1.0, axis=1)
    return _lm_example(seq, weights)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectiveCopy(base.GeneratedTask):
  """Selective copying (Mamba: Linear-Time Sequence Modeling with Selective State Spaces, Gu & Dao,
  arXiv:2312.00752, section 3.1).

  Token ids: 0 blank, 1 separator, `2 .. 2 + num_noise_tokens - 1` noise, the rest data. A context
  of `T - num_tokens` positions holds `num_tokens` data tokens at random positions (in order of
  position) among blanks (or, when `num_noise_tokens > 0`, uniform noise tokens); then the
  separator, then the data tokens again in the same order. Weights are 1 where the target is a
  copied data token: the separator and the copies before the last.
  """
  name = "selective_copy"
  vocab_size: int = 16
  seq_len: int = 64
  num_tokens: int = 8
  num_noise_tokens: int = 0

  def __post_init__(self):
    super().__post_init__()
    base.check_int("num_tokens", self.num_tokens, minimum=1)
    base.check_int("seq_len", self.seq_len, minimum=2 * self.num_tokens)
    base.check_int("num_noise_tokens", self.num_noise_tokens, minimum=0)
    base.check_int("vocab_size", self.vocab_size, minimum=self.num_noise_tokens + 4)

  @property
  def spec(self) -> base.TaskSpec:
    return _lm_spec(self.name, self.seq_len, self.vocab_size)

  def draw(self, rng, n):
    k = self.num_tokens
    context = self.seq_len - k
    first_data = 2 + self.num_noise_tokens
    positions = np.sort(_choose_distinct(rng, n, context, k), axis=1)
    data = rng.integers(first_data, self.vocab_size, size=(n, k))
    if self.num_noise_tokens:
      seq = rng.integers(2, first_data, size=(n, context))
    else:
      seq = np.zeros((n, context), np.int64)
    np.put_along_axis(seq, positions, data, axis=1)
    seq = np.concatenate([seq, np.ones((n, 1), np.int64), data], axis=1)
    weights = np.zeros((n, self.seq_len), np.float32)
    weights[:, context:] = 1.0
    return _lm_example(seq, weights)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Induction(base.GeneratedTask):
  """Induction heads (Mamba, Gu & Dao, arXiv:2312.00752, section 3.1; Olsson et al. 2022).

  Token 0 is the trigger; the other tokens are uniform over `1 .. V - 1`. The trigger appears once
  at a random position p <= T - 3, followed by the answer token; the last input is the trigger again
  and its target (the only weighted one) is the answer, the token that followed the trigger earlier.
  """
  name = "induction"
  vocab_size: int = 16
  seq_len: int = 64

  def __post_init__(self):
    super().__post_init__()
    base.check_int("vocab_size", self.vocab_size, minimum=3)
    base.check_int("seq_len", self.seq_len, minimum=4)

  @property
  def spec(self) -> base.TaskSpec:
    return _lm_spec(self.name, self.seq_len, self.vocab_size)

  def draw(self, rng, n):
    t = self.seq_len
    seq = rng.integers(1, self.vocab_size, size=(n, t + 1))
    trigger_pos = rng.integers(0, t - 2, size=n)
    rows = np.arange(n)
    seq[rows, trigger_pos] = 0
    seq[:, t - 1] = 0
    seq[:, t] = seq[rows, trigger_pos + 1]
    weights = np.zeros((n, t), np.float32)
    weights[:, t - 1] = 1.0
    return _lm_example(seq, weights)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sorting(base.GeneratedTask):
  """Sorting: `T / 2` tokens, the separator, then the same tokens in ascending order.

  Tokens are drawn from `1 .. V - 1`; the separator is 0. Weights are 1 where the target is a sorted
  token (the separator and the sorted tokens before the last). With `distinct`, the tokens are drawn
  without replacement.
  """
  name = "sorting"
  vocab_size: int = 32
  seq_len: int = 32
  distinct: bool = False

  def __post_init__(self):
    super().__post_init__()
    base.check_int("vocab_size", self.vocab_size, minimum=3)
    base.check_int("seq_len", self.seq_len, minimum=2)
    if self.seq_len % 2:
      raise base.config_error("seq_len", self.seq_len, "must be even (T/2 tokens, then T/2 sorted)")
    base.check_bool("distinct", self.distinct)
    if self.distinct and self.seq_len // 2 > self.vocab_size - 1:
      raise base.config_error("vocab_size", self.vocab_size,
                              f"distinct needs vocab_size - 1 >= seq_len / 2 = {self.seq_len // 2}")

  @property
  def spec(self) -> base.TaskSpec:
    return _lm_spec(self.name, self.seq_len, self.vocab_size)

  def draw(self, rng, n):
    k = self.seq_len // 2
    if self.distinct:
      tokens = _choose_distinct(rng, n, self.vocab_size - 1, k) + 1
    else:
      tokens = rng.integers(1, self.vocab_size, size=(n, k))
    seq = np.concatenate([tokens, np.zeros((n, 1), np.int64), np.sort(tokens, axis=1)], axis=1)
    weights = np.zeros((n, self.seq_len), np.float32)
    weights[:, k:] = 1.0
    return _lm_example(seq, weights)
