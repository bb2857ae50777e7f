"""Bad config values stop the run at start, naming the field, before anything is compiled or any
workdir is created; the schedule fields left None follow train.num_steps."""

import math
import os

import jax
import numpy as np
import pytest

from attnjax import models
from attnjax.data.base import TaskSpec
from attnjax.train import metrics as metrics_lib
from attnjax.train import trainer
from attnjax.train import validate
from configs import common as configs_common
from tests import tolerances
from tests.train import fakes_test


class _CompileCounter:
  """Counts XLA backend compiles (jax.monitoring events) while active."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


@pytest.fixture(name="compiles")
def _compiles():
  counter = _CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter)
  yield counter
  jax.monitoring.unregister_event_duration_listener(counter)


def _bad(section, **values):
  """The fake config with `values` set in `section` (the mesh is replaced)."""
  config = fakes_test.make_config()
  if section == "mesh":
    config.mesh = values
  else:
    getattr(config, section).update(values)
  return config


@pytest.mark.parametrize("config, field", [
    (_bad("model", mechanism="no_such_attention"), "model.mechanism"),
    (_bad("model", layer_mechanisms="every 2: nope"), "model.layer_mechanisms"),
    (_bad("model", width=18, num_heads=4), "model.num_heads"),
    (_bad("model", num_kv_heads=3), "model.num_kv_heads"),
    (_bad("model", dtype="float16"), "model.dtype"),
    (_bad("mesh", data=jax.device_count() + 1), "mesh"),
    (_bad("mesh", data=-1, tensor=jax.device_count() + 1), "mesh"),
    (_bad("mesh", bogus=2), "mesh"),
    (_bad("optimizer", decay="linear"), "optimizer.decay"),
    (_bad("optimizer", learning_rate=0.0), "optimizer.learning_rate"),
    (_bad("optimizer", grad_accum_steps=0), "optimizer.grad_accum_steps"),
    (_bad("train", num_steps=0), "train.num_steps"),
    (_bad("train", batch_size=0), "train.batch_size"),
])
def test_bad_value_raises_naming_the_field_before_any_compile(config, field, tmp_path, compiles):
  parts = fakes_test.fake_parts(config)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    trainer.train_and_evaluate(config, str(tmp_path / "w"), **parts)
  assert compiles.count == 0
  assert not os.path.exists(tmp_path / "w")  # validation fails before the workdir is created


def test_unwritable_workdir(tmp_path, compiles):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  config = fakes_test.make_config()
  with pytest.raises(ValueError, match="workdir"):
    trainer.train_and_evaluate(config, str(blocker / "run"), **fakes_test.fake_parts(config))
  if os.geteuid() != 0:  # root writes anywhere: only the not-a-directory case is portable
    readonly = tmp_path / "ro"
    readonly.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="workdir"):
      validate.validate_config(config, str(readonly))
  assert compiles.count == 0


def test_good_config_returns_mesh_shape(tmp_path):
  shape = validate.validate_config(fakes_test.make_config(), str(tmp_path))
  assert shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1, "context": 1}


def test_mechanism_names_from_schedule_and_list():
  config = fakes_test.make_config()
  config.model.layer_mechanisms = "every 4: alibi"
  assert validate.mechanism_names(config.model) == ["softmax", "alibi"]
  config = fakes_test.make_config()
  config.model.layer_mechanisms = ["softmax"]
  assert validate.mechanism_names(config.model) == ["softmax", "softmax"]


_LM_SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(8,), input_dtype="int32",
                    vocab_size=40, num_classes=40, seq_len=8)


@pytest.mark.parametrize("model", [
    dict(mechanism="no_such_attention"),
    dict(layer_mechanisms="every 2: nope"),  # a name no layer uses at depth 1: still checked
    dict(layer_mechanisms="every 0: softmax"),
    dict(layer_mechanisms=["softmax", "softmax"]),  # two names for depth 1
    dict(width=18, num_heads=4),
    dict(num_kv_heads=3),
    dict(width=-8),
    dict(dtype="float16"),
    dict(mlp="relu"),
    dict(dropout=1.5),
    dict(mechanism="sliding_window", mechanism_kwargs={"windw": 4}),
    dict(num_head=4),
])
def test_validate_and_build_model_give_one_message_per_mistake(model):
  """The model section has one schema (attnjax.models.ModelConfig): the run's start-up check and
  build_model raise the same message for the same mistake."""
  config = _bad("model", **model)
  with pytest.raises(ValueError) as from_validate:
    validate.check_config(config)
  with pytest.raises(ValueError) as from_build:
    models.build_model(config.model, _LM_SPEC)
  assert str(from_validate.value).startswith("model")
  assert str(from_validate.value) == str(from_build.value)


def _listing(path):
  return sorted((p, os.stat(os.path.join(path, p)).st_mtime_ns) for p in os.listdir(path))


def test_failed_validation_leaves_no_workdir_and_an_existing_one_as_it_was(tmp_path):
  bad = _bad("model", width=18, num_heads=4)
  with pytest.raises(ValueError, match=r"model\.num_heads \(4\) must divide model\.width \(18\)"):
    validate.validate_config(bad, str(tmp_path / "new" / "run"))
  assert not os.path.exists(tmp_path / "new")
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  before = _listing(existing)
  with pytest.raises(ValueError, match="model.num_heads"):
    validate.validate_config(bad, str(existing))
  assert _listing(existing) == before
  validate.validate_config(fakes_test.make_config(), str(existing))  # the write test cleans up
  assert _listing(existing) == before


def test_validate_without_create_touches_no_file(tmp_path):
  validate.validate_config(fakes_test.make_config(), str(tmp_path / "a" / "b"),
                           create_workdir=False)
  assert not os.path.exists(tmp_path / "a")
  validate.check_workdir(str(tmp_path / "a" / "b"), create=True)
  assert os.path.isdir(tmp_path / "a" / "b") and not os.listdir(tmp_path / "a" / "b")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="workdir.*not a directory"):
    validate.check_workdir(str(blocker / "run"))


def _schedule_fields(config):
  return (config.optimizer.warmup_steps, config.train.eval_every, config.train.checkpoint_every)


@pytest.mark.parametrize("num_steps, accum, expected", [
    # warm-up min(100, updates // 10), updates = num_steps // accum; eval and save num_steps // 5.
    (100, 1, (10, 20, 20)),
    (1000, 1, (100, 200, 200)),
    (5000, 1, (100, 1000, 1000)),
    (1000, 4, (25, 200, 200)),
    (3, 1, (0, 1, 1)),
])
def test_schedule_fields_follow_num_steps(num_steps, accum, expected):
  config = configs_common.base_config()
  config.lock()  # as the command line loads it
  assert _schedule_fields(config) == (None, None, None)
  config.train.num_steps = num_steps
  config.optimizer.grad_accum_steps = accum
  assert _schedule_fields(validate.resolve_config(config)) == expected


def test_explicit_schedule_fields_are_kept():
  config = configs_common.base_config()
  config.train.num_steps = 100
  config.train.eval_every = 7
  config.optimizer.warmup_steps = 0
  validate.check_config(config)
  assert _schedule_fields(config) == (0, 7, 20)


def test_a_run_with_derived_schedule_evaluates_saves_and_warms_up_by_num_steps(tmp_path):
  # num_steps 20 -> eval and save every 4 steps, warm-up 2 updates: read back from the run.
  config = fakes_test.make_config(num_steps=20, log_every=1, keep_checkpoints=10)
  config.train.eval_every = config.train.checkpoint_every = None
  config.optimizer.warmup_steps = None
  trainer.train_and_evaluate(config, str(tmp_path), **fakes_test.fake_parts(config))
  records = metrics_lib.read_jsonl(str(tmp_path))
  assert [r["step"] for r in records if "eval_accuracy" in r] == [4, 8, 12, 16, 20]
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == \
      [4, 8, 12, 16, 20]
  # The rate logged at step s is that of update u = s - 1 (optim.py's formula, warm-up W = 2).
  peak, warm, total = config.optimizer.learning_rate, 2, 20
  expected = [peak * u / warm if u < warm else
              peak * (1 + math.cos(math.pi * (u - warm) / (total - warm))) / 2
              for u in range(total)]
  logged = [r["learning_rate"] for r in records if "learning_rate" in r]
  np.testing.assert_allclose(logged, expected, **tolerances.output(np.float32))
