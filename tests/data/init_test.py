"""The task contract, for every task: shapes and dtypes per TaskSpec, determinism, process slicing,
train/valid separation, and make_task's config checking."""

import chex
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import data
from attnjax.data import base

# Small, fast configs of every task (the defaults, shrunk where generation is slow).
CONFIGS = {
    "mqar": {},
    "selective_copy": {},
    "induction": {},
    "sorting": {},
    "listops": {"seq_len": 48, "min_length": 8},
    "digits": {},
    "digits_pixels": {"name": "digits", "representation": "pixels"},
    "lm_bytes": {"seq_len": 32},
    "textures": {},
}
BATCH = 8


def build(key, **overrides):
  config = dict(CONFIGS[key])
  name = config.pop("name", key)
  return data.make_task(ml_collections.ConfigDict({"name": name, **config, **overrides}))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def key(request):
  return request.param


def test_every_task_is_configured_here():
  assert set(data.TASKS) == {CONFIGS[k].get("name", k) for k in CONFIGS}


def test_batch_matches_spec(key):
  task = build(key)
  assert isinstance(task, data.Task)
  spec = task.spec
  assert spec.kind in ("lm", "classify")
  batch = task.batch(3, BATCH)
  assert set(batch) == {"inputs", "targets", "weights"}
  chex.assert_shape(batch["inputs"], (BATCH, *spec.input_shape))
  assert batch["inputs"].dtype == np.dtype(spec.input_dtype)
  target_shape = (BATCH, spec.seq_len) if spec.kind == "lm" else (BATCH,)
  chex.assert_shape([batch["targets"], batch["weights"]], target_shape)
  assert batch["targets"].dtype == np.int32 and batch["weights"].dtype == np.float32
  assert set(np.unique(batch["weights"])) <= {0.0, 1.0}
  assert batch["weights"].sum() > 0
  assert batch["targets"].min() >= 0 and batch["targets"].max() < spec.num_classes
  if spec.input_dtype == "int32":
    assert spec.vocab_size > 0 and spec.input_shape == (spec.seq_len,)
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < spec.vocab_size
  else:
    assert spec.vocab_size == 0


@pytest.mark.parametrize("split", data.SPLITS)
def test_same_step_same_batch_other_step_other_batch(key, split):
  first = build(key).batch(5, BATCH, split=split)
  again = build(key).batch(5, BATCH, split=split)  # A fresh task: nothing carried between calls.
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first["inputs"], build(key).batch(6, BATCH, split=split)["inputs"])
  other_seed = build(key, seed=1).batch(5, BATCH, split=split)
  assert not np.array_equal(first["inputs"], other_seed["inputs"])


def test_process_slices_concatenate_to_the_global_batch(key):
  task = build(key)
  whole = task.batch(2, BATCH)
  parts = [task.batch(2, BATCH, process_index=i, process_count=4) for i in range(4)]
  for part in parts:
    assert len(part["inputs"]) == BATCH // 4
  chex.assert_trees_all_equal(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})


def test_train_and_valid_differ(key):
  task = build(key)
  assert not np.array_equal(task.batch(0, BATCH)["inputs"],
                            task.batch(0, BATCH, split="valid")["inputs"])


@pytest.mark.parametrize("name", ["mqar", "selective_copy", "induction", "sorting", "listops"])
def test_generated_valid_rows_never_appear_in_train(name):
  # Small input spaces (sorting 4 tokens from 3 symbols: 81 inputs) make repeats certain, so only
  # the hash rule keeps the splits apart.
  small = {"sorting": {"vocab_size": 4, "seq_len": 8}, "induction": {"vocab_size": 3, "seq_len": 5},
           "selective_copy": {"vocab_size": 4, "seq_len": 6, "num_tokens": 2},
           "mqar": {"vocab_size": 8, "seq_len": 8, "num_kv_pairs": 2},
           "listops": {"seq_len": 8, "min_length": 4, "max_depth": 2, "max_args": 2}}[name]
  task = data.make_task({"name": name, **small})
  train = np.concatenate([task.batch(s, 64)["inputs"] for s in range(4)])
  valid = np.concatenate([task.batch(s, 64, split="valid")["inputs"] for s in range(4)])
  assert not base.in_valid_split(train).any() and base.in_valid_split(valid).all()
  train_rows, valid_rows = set(map(bytes, train)), set(map(bytes, valid))
  assert len(valid_rows) > 1 and len(train_rows) > 1
  assert not train_rows & valid_rows


@pytest.mark.parametrize("kwargs, argument", [
    (dict(step=-1, batch_size=4), "step"),
    (dict(step=0, batch_size=0), "batch_size"),
    (dict(step=0, batch_size=6, process_count=4), "batch_size"),
    (dict(step=0, batch_size=4, process_index=2, process_count=2), "process_index"),
    (dict(step=0, batch_size=4, split="test"), "split"),
    (dict(step=1.5, batch_size=4), "step"),
])
def test_bad_batch_arguments_raise(key, kwargs, argument):
  with pytest.raises(ValueError, match=f"`{argument}`"):
    build(key).batch(**kwargs)


def test_integer_arrays_are_accepted_as_step(key):
  # A step restored from a checkpoint may be a numpy or jax integer scalar.
  chex.assert_trees_all_equal(build(key).batch(np.int64(3), BATCH),
                              build(key).batch(jnp.asarray(3), BATCH), build(key).batch(3, BATCH))


def test_default_config_builds_every_task():
  for name in data.TASKS:
    config = data.default_config(name)
    assert config.name == name and "seed" in config
    assert data.make_task(config).spec.name == name


def test_make_task_accepts_a_plain_dict():
  chex.assert_trees_all_equal(data.make_task({"name": "mqar", "seed": 3}).batch(0, 4),
                              data.make_task(ml_collections.ConfigDict(
                                  {"name": "mqar", "seed": 3})).batch(0, 4))


@pytest.mark.parametrize("config, field", [
    ({"name": "nope"}, "name"),
    ({}, "name"),
    ({"name": "mqar", "num_kv_pair": 4}, "num_kv_pair"),
    ({"name": "mqar", "seed": -1}, "seed"),
    ({"name": "mqar", "vocab_size": 2}, "vocab_size"),
    ({"name": "mqar", "num_kv_pairs": 20}, "seq_len"),
    ({"name": "mqar", "num_kv_pairs": 200}, "num_kv_pairs"),
    ({"name": "mqar", "power_a": 0.0}, "power_a"),
    ({"name": "mqar", "seq_len": 64.0}, "seq_len"),
    ({"name": "mqar", "random_non_queries": 1}, "random_non_queries"),
    ({"name": "selective_copy", "num_tokens": 40}, "seq_len"),
    ({"name": "selective_copy", "num_noise_tokens": 13}, "vocab_size"),
    ({"name": "induction", "seq_len": 3}, "seq_len"),
    ({"name": "induction", "vocab_size": 2}, "vocab_size"),
    ({"name": "sorting", "seq_len": 31}, "seq_len"),
    ({"name": "sorting", "distinct": True, "vocab_size": 8}, "vocab_size"),
    ({"name": "listops", "max_depth": 1}, "max_depth"),
    ({"name": "listops", "max_args": 1}, "max_args"),
    ({"name": "listops", "min_length": 200}, "min_length"),
    ({"name": "listops", "max_depth": 2, "max_args": 3, "min_length": 6}, "min_length"),
    ({"name": "digits", "representation": "patches"}, "representation"),
    ({"name": "digits", "valid_fraction": 1.0}, "valid_fraction"),
    ({"name": "lm_bytes", "data_dir": "/nonexistent/dir"}, "data_dir"),
    ({"name": "lm_bytes", "valid_fraction": 0.0}, "valid_fraction"),
    ({"name": "lm_bytes", "seq_len": 0}, "seq_len"),
])
def test_bad_config_raises_naming_the_field(config, field):
  with pytest.raises(ValueError, match=f"`{field}`"):
    data.make_task(config)
