"""Experiment configs (configs/*.py) and the sweep (experiments/sweep.py): every config builds a
valid run, configs import nothing of attnjax, the parameter-budget check, the leaderboard files and
the skip of finished runs."""

import ast
import csv
import json
import os
import subprocess
import sys

import pytest

from attnjax import data
from attnjax import models
from attnjax.train import trainer
from attnjax.train import validate
from experiments import sweep
from tests.train import fakes_test

CONFIGS = ("mqar", "selective_copy", "induction", "listops", "lm_bytes", "digits_vit")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", ("tiny", "small"))
def test_config_builds_a_valid_run(name, size, tmp_path):
  config = sweep.load_config(f"configs/{name}.py:mechanism=softmax,size={size}")
  validate.validate_config(config, str(tmp_path))
  task = data.make_task(config.task)
  model = models.build_model(trainer.model_config_for_run(config), task.spec)
  assert models.param_count(models.abstract_variables(model, task.spec)["params"]) > 0
  with open(os.path.join(fakes_test.REPO, "configs", f"{name}.py")) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  assert f"--config=configs/{name}.py" in doc and "2-core CPU" in doc


def test_config_argument_errors_name_the_key():
  with pytest.raises(ValueError, match="size"):
    sweep.load_config("configs/mqar.py:size=huge")
  with pytest.raises(ValueError, match="colour"):
    sweep.load_config("configs/mqar.py:colour=red")
  with pytest.raises(ValueError, match="window='wide': expected int"):
    sweep.load_config("configs/mqar.py:window=wide")


# (num_steps of size=small, warm-up, eval/checkpoint cadence) as the configs set them explicitly
# before the schedule was derived: resolving reproduces them.
SMALL_SCHEDULES = {"mqar": (1500, 100, 300), "selective_copy": (1000, 100, 200),
                   "induction": (3000, 100, 600), "listops": (2000, 100, 400),
                   "lm_bytes": (2000, 100, 400), "digits_vit": (1500, 100, 300)}


@pytest.mark.parametrize("name", CONFIGS)
def test_schedule_follows_a_num_steps_override(name):
  config = sweep.load_config(f"configs/{name}.py")
  num_steps, warmup, every = SMALL_SCHEDULES[name]
  assert config.train.num_steps == num_steps
  resolved = validate.resolve_config(sweep.load_config(f"configs/{name}.py"))
  assert (resolved.optimizer.warmup_steps, resolved.train.eval_every,
          resolved.train.checkpoint_every) == (warmup, every, every)
  config.train.num_steps = 100  # as --config.train.num_steps=100 does
  validate.resolve_config(config)
  assert (config.optimizer.warmup_steps, config.train.eval_every,
          config.train.checkpoint_every) == (10, 20, 20)


def test_configs_load_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert sweep.load_config("configs/mqar.py:size=tiny").task.seq_len == 32
  with pytest.raises(ValueError, match="no config file 'configs/nope.py'.*configs/mqar.py"):
    sweep.load_config("configs/nope.py")


def test_sweep_errors_name_the_run_and_the_field():
  config = sweep.load_config("configs/sweeps/mqar_demo.py")
  with pytest.raises(ValueError, match="'model.colour'.*no field 'colour'"):
    sweep.apply_overrides(sweep.load_config("configs/mqar.py"), {"model.colour": "red"})
  with pytest.raises(ValueError, match="'optimiser.lr'.*no field 'optimiser'"):
    sweep.apply_overrides(sweep.load_config("configs/mqar.py"), {"optimiser.lr": 1.0})
  config.runs = [{"name": "odd_heads", "config": "configs/mqar.py:size=tiny",
                  "overrides": {"model.num_heads": 5}}]
  with pytest.raises(ValueError, match=r"run 'odd_heads'.*model\.num_heads \(5\)"):
    sweep.plan(config)


def test_configs_import_nothing_of_attnjax():
  # A config is loaded while flags are parsed, before jax.distributed.initialize, which must come
  # before anything touches the backend (and importing attnjax does).
  code = ("import sys; from experiments import sweep\n"
          "for n in %r: sweep.load_config('configs/%%s.py' %% n)\n"
          "sweep.load_config('configs/sweeps/mqar_demo.py')\n"
          "assert not [m for m in sys.modules if m.startswith('attnjax')], 'attnjax imported'"
          % (CONFIGS,))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=fakes_test.REPO,
                 env={**os.environ, "PYTHONPATH": fakes_test.REPO})


def test_demo_sweep_is_within_the_parameter_budget():
  runs = sweep.plan(sweep.load_config("configs/sweeps/mqar_demo.py"))
  names = [r[0] for r in runs]
  assert names[0] == "softmax" and len(names) >= 3
  first = runs[0][2]
  assert all(abs(p - first) <= 0.1 * first for _, _, p, _ in runs)
  # Decode state: KV cache 2·T·D per layer for softmax, a 16-token window, h·(h+1) per head.
  states = {name: state for name, _, _, state in runs}
  assert states["softmax"] == 2 * 2 * 64 * 64
  assert states["sliding_window_16"] == 2 * 2 * 16 * 64
  assert states["cosine_linear"] == 2 * 2 * 32 * 32   # layers · heads · H · h (no normalizer)


@pytest.mark.parametrize("name", ("lm_bytes_sinks", "sparse_mqar", "digits_na"))
def test_recorded_sweeps_plan_within_their_budget(name):
  """The sweeps behind docs/results.md build every run, at parameters within their tolerance."""
  runs = sweep.plan(sweep.load_config(f"configs/sweeps/{name}.py"))
  assert len(runs) >= 2


def test_budget_check_rejects_a_run_outside_ten_percent():
  config = sweep.load_config("configs/sweeps/mqar_demo.py")
  config.runs = list(config.runs) + [{"name": "wide", "config": "configs/mqar.py",
                                       "overrides": {"model.width": 96, "model.mlp_dim": 192}}]
  with pytest.raises(ValueError, match="budget_tolerance.*wide"):
    sweep.plan(config)


def test_leaderboard_files_and_skip_of_finished_runs(tmp_path, capsys):
  config = sweep.load_config("configs/mqar.py:size=tiny")
  runs = [("a", config, 100, 4096), ("b", config, 105, 1024)]
  results = [{"eval_accuracy": 0.5, "eval_loss": 1.0, "steps_per_sec": 2.0,
              "tokens_per_sec": 64.0, "train_seconds": 3.0, "step": 300},
             {"eval_accuracy": 0.9, "eval_loss": 0.2, "steps_per_sec": 4.0,
              "tokens_per_sec": 128.0, "train_seconds": 2.0, "step": 300}]
  rows = sweep.leaderboard_rows(runs, results)
  assert [r["name"] for r in rows] == ["b", "a"]  # best accuracy first
  assert rows[0]["params_vs_first"] == "+5.0%"
  table = sweep.write_leaderboard(rows, str(tmp_path), "cmd")
  assert "| b | mqar | softmax | 105 | +5.0% | 1,024 | 0.9000 |" in table
  with open(tmp_path / "leaderboard.csv") as f:
    assert [r["name"] for r in csv.DictReader(f)] == ["b", "a"]
  with open(tmp_path / "leaderboard.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # A run whose result.json has the config's final step is not trained again.
  os.makedirs(tmp_path / "a")
  with open(tmp_path / "a" / sweep.RESULT, "w") as f:
    json.dump(results[0], f)
  assert sweep.run_one("a", config, str(tmp_path)) == results[0]
  assert "finished earlier, skipped" in capsys.readouterr().out
