"""The shared helpers: per-step generators, process rows, argument checks and the split hash."""

import numpy as np
import pytest

from attnjax.data import base
from tests import tolerances


def test_step_rng_depends_only_on_seed_split_and_step():
  draw = lambda *args: base.step_rng(*args).integers(0, 2**31, size=8)
  np.testing.assert_array_equal(draw(3, "train", 7), draw(3, "train", 7))
  for other in [(4, "train", 7), (3, "valid", 7), (3, "train", 8)]:
    assert not np.array_equal(draw(3, "train", 7), draw(*other))
  np.testing.assert_array_equal(
      draw(3, "valid", 7),
      np.random.default_rng(np.random.SeedSequence([3, 1, 7])).integers(0, 2**31, size=8))


def test_process_rows_tile_the_batch():
  rows = [base.process_rows(12, i, 3) for i in range(3)]
  assert rows == [slice(0, 4), slice(4, 8), slice(8, 12)]


def test_check_batch_args_returns_this_process_rows():
  assert base.check_batch_args(0, 8, "valid", 1, 2) == slice(4, 8)
  with pytest.raises(ValueError, match="`split`"):
    base.check_batch_args(0, 8, "eval", 0, 1)


def test_row_hash_is_fixed_and_splits_about_one_bucket_to_valid():
  rows = np.random.default_rng(0).integers(0, 50, size=(4000, 12))
  h = base.row_hash(rows)
  np.testing.assert_array_equal(h, base.row_hash(rows.copy()))
  assert len(np.unique(h)) == len(np.unique(rows, axis=0))
  # The same row hashes the same wherever it sits in a batch.
  assert base.row_hash(rows[5:6])[0] == h[5]
  fraction = base.in_valid_split(rows).mean()
  assert abs(fraction - 1 / base.VALID_BUCKETS) < tolerances.SIGMAS * np.sqrt(0.25 * 0.75 / 4000)
  # Changing any one token moves a row to a new hash.
  moved = rows.copy()
  moved[:, 7] += 1
  assert (base.row_hash(moved) != h).all()


@pytest.mark.parametrize("check, value", [
    (lambda v: base.check_int("width", v, minimum=1), 0),
    (lambda v: base.check_int("width", v), 2.0),
    (lambda v: base.check_int("width", v), True),
    (lambda v: base.check_float("width", v, low=0, high=1), 1.5),
    (lambda v: base.check_float("width", v, low=0, high=1), float("nan")),
    (lambda v: base.check_float("width", v, low=0, high=1, low_open=True), 0.0),
    (lambda v: base.check_bool("width", v), "yes"),
])
def test_checks_name_the_field(check, value):
  with pytest.raises(ValueError, match="`width`"):
    check(value)
