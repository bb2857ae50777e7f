"""Bad config values stop the run at start, naming the field, before anything is compiled."""

import os

import jax
import pytest

from attnjax.train import trainer
from attnjax.train import validate
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
    (_bad("model", layer_mechanisms="every 2: nope"), "model.mechanism"),
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
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


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
