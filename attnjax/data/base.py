"""What a task is (`TaskSpec`, `Task`) and the helpers every task shares.

A task's batch is a pure function of (task config incl. seed, split, step, process): the randomness
of global batch `step` comes from `make_rng(seed, split, step)`, a `np.random.Generator` seeded with
the `SeedSequence` of those integers, so a data iterator's whole state is the step number (what a
checkpoint saves), and any step can be regenerated without replaying the ones before it.

Each process draws the same global batch and keeps its own contiguous rows (`process_rows`), so the
concatenation of the process slices, in process order, is the global batch.

Synthetic tasks keep train and valid disjoint by construction: a row belongs to valid exactly when a
fixed hash of its inputs falls in a bucket holding `1 / VALID_BUCKETS` of the input space
(`in_valid_split`), and each split keeps only its own rows. The same inputs therefore can never
appear in both splits, whatever the seeds and steps.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import numbers
import operator
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import numpy as np

SPLITS = ("train", "valid")
# One bucket of VALID_BUCKETS (by input hash) is the valid split; train keeps the other ones.
VALID_BUCKETS = 4
# Draw rounds before giving up on filling a batch from one split (a tiny input space can make a
# split nearly empty, e.g. sorting 2 tokens from a vocabulary of 3).
_MAX_DRAW_ROUNDS = 64


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a model needs to know about a task's examples.

  Attributes:
    name: task name (the `name` field of its config).
    kind: "lm" (a target per position, `targets [b, T]`) or "classify" (one label per example,
      `targets [b]`).
    input_shape: one example's inputs: `(T,)` tokens, or `(H, W, C)` for an image.
    input_dtype: "int32" (tokens) or "float32" (images).
    vocab_size: input token vocabulary (0 for images).
    num_classes: output size: the vocabulary for "lm", the number of labels for "classify".
    seq_len: T, tokens per example (for images: the pixel count; patching is the model's business).
  """
  name: str
  kind: str
  input_shape: tuple
  input_dtype: str
  vocab_size: int
  num_classes: int
  seq_len: int


@runtime_checkable
class Task(Protocol):
  """A deterministic, resumable source of batches."""
  spec: TaskSpec

  def batch(self, step: int, batch_size: int, *, split: str = "train", process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows (`batch_size // process_count`) of global batch `step`.

    Returns `inputs [b, *input_shape]` (int32 or float32), `targets` (`[b, T]` int32 for "lm", `[b]`
    int32 for "classify") and `weights` (float32, shaped like `targets`: 1 where the loss and
    accuracy count, 0 elsewhere).
    """
    ...


def config_error(field: str, value: Any, message: str) -> ValueError:
  """The error every task raises for a bad config value: it names the field."""
  return ValueError(f"task config field `{field}`={value!r}: {message}")


def check_int(field: str, value: Any, *, minimum: Optional[int] = None,
              maximum: Optional[int] = None) -> None:
  """Raises a ValueError naming `field` unless `value` is an int in [minimum, maximum]."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise config_error(field, value, "must be an integer")
  if minimum is not None and value < minimum:
    raise config_error(field, value, f"must be >= {minimum}")
  if maximum is not None and value > maximum:
    raise config_error(field, value, f"must be <= {maximum}")


def check_float(field: str, value: Any, *, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> None:
  """Raises a ValueError naming `field` unless `value` is a real number in the given interval."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise config_error(field, value, "must be a number")
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high or not np.isfinite(value):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise config_error(field, value, f"must lie in {interval}")


def check_bool(field: str, value: Any) -> None:
  """Raises a config error unless `value` is a Python or NumPy bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise config_error(field, value, "must be True or False")


def make_rng(seed: int, split: str, *counters: int) -> np.random.Generator:
  """A generator that depends only on its arguments: `SeedSequence([seed, split_id, *counters])`."""
  entropy = [operator.index(seed), SPLITS.index(split), *map(operator.index, counters)]
  return np.random.default_rng(np.random.SeedSequence(entropy))


def step_rng(seed: int, split: str, step: int) -> np.random.Generator:
  """The generator for global batch `step` of `split`."""
  return make_rng(seed, split, step)


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows of the global batch that process `process_index` of `process_count` owns (contiguous)."""
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def _batch_int(name: str, value: Any, minimum: int) -> int:
  # operator.index accepts Python and numpy integers and integer 0-d arrays (a restored step
  # counter), and refuses floats.
  try:
    if isinstance(value, bool):
      raise TypeError
    as_int = operator.index(value)
  except TypeError:
    as_int = None
  if as_int is None or as_int < minimum:
    raise ValueError(f"batch(): `{name}`={value!r} must be an integer >= {minimum}")
  return as_int


def check_batch_args(step: Any, batch_size: Any, split: Any, process_index: Any,
                     process_count: Any) -> slice:
  """Validates `Task.batch` arguments (ValueError naming the argument); returns `process_rows`."""
  _batch_int("step", step, 0)
  batch_size = _batch_int("batch_size", batch_size, 1)
  process_count = _batch_int("process_count", process_count, 1)
  process_index = _batch_int("process_index", process_index, 0)
  if split not in SPLITS:
    raise ValueError(f"batch(): `split`={split!r} must be one of {SPLITS}")
  if process_index >= process_count:
    raise ValueError(f"batch(): `process_index`={process_index} must be < process_count="
                     f"{process_count}")
  if batch_size % process_count:
    raise ValueError(f"batch(): `batch_size`={batch_size} must be divisible by process_count="
                     f"{process_count}")
  return process_rows(batch_size, process_index, process_count)


@functools.lru_cache(maxsize=64)
def _hash_multipliers(width: int) -> np.ndarray:
  # Fixed odd 64-bit multipliers, one per position: the hash (and so the split) never changes.
  rng = np.random.default_rng(0x5EED5EED)
  return rng.integers(1, 2**63, size=width, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def row_hash(rows: np.ndarray) -> np.ndarray:
  """A fixed 64-bit hash of each integer row: `mix(sum_t (x_t + 1) * m_t mod 2^64)` -> `[n]` uint64.

  `mix` is the splitmix64 finalizer, so every output bit depends on every input token.
  """
  flat = np.asarray(rows).reshape(len(rows), -1).astype(np.int64).astype(np.uint64)
  h = ((flat + np.uint64(1)) * _hash_multipliers(flat.shape[1])[None, :]).sum(
      axis=1, dtype=np.uint64)
  h ^= h >> np.uint64(30)
  h *= np.uint64(0xBF58476D1CE4E5B9)
  h ^= h >> np.uint64(27)
  h *= np.uint64(0x94D049BB133111EB)
  h ^= h >> np.uint64(31)
  return h


def in_valid_split(rows: np.ndarray) -> np.ndarray:
  """`[n]` bool: whether each row of integer inputs belongs to the valid split."""
  return row_hash(rows) % np.uint64(VALID_BUCKETS) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneratedTask(abc.ABC):
  """Base of tasks whose examples are drawn fresh for each step from `step_rng`.

  Subclasses set `name`, implement `spec` and `draw(rng, n)` (n independent examples as a dict of
  `inputs`, `targets`, `weights`), and validate their fields in `__post_init__`. `batch` draws until
  the split's rows fill the global batch, then slices this process's rows.
  """
  name: ClassVar[str]
  seed: int = 0

  def __post_init__(self):
    check_int("seed", self.seed, minimum=0)

  @property
  @abc.abstractmethod
  def spec(self) -> TaskSpec:
    """The task's TaskSpec."""

  @abc.abstractmethod
  def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """`n` independent examples drawn from `rng` (before the train/valid filter)."""

  def batch(self, step: int, batch_size: int, *, split: str = "train", process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    rows = check_batch_args(step, batch_size, split, process_index, process_count)
    rng = step_rng(self.seed, split, step)
    want_valid = split == "valid"
    parts, have = [], 0
    for _ in range(_MAX_DRAW_ROUNDS):
      if have >= batch_size:
        break
      # Draw 15% more than the expected need (the keep rate is 1/VALID_BUCKETS for valid, the rest
      # for train) so that one round almost always suffices without wasting much generation.
      keep_rate = 1 / VALID_BUCKETS if want_valid else 1 - 1 / VALID_BUCKETS
      draw_n = int((batch_size - have) / keep_rate * 1.15) + 8
      drawn = self.draw(rng, draw_n)
      keep = in_valid_split(drawn["inputs"]) == want_valid
      parts.append({k: v[keep] for k, v in drawn.items()})
      have += int(keep.sum())
    if have < batch_size:
      raise RuntimeError(f"task {self.name!r}: could not fill a {split} batch of {batch_size} in "
                         f"{_MAX_DRAW_ROUNDS} draws; the input space is too small for a "
                         "train/valid split (enlarge vocab_size or seq_len)")
    return {k: np.concatenate([p[k] for p in parts])[:batch_size][rows] for k in parts[0]}
