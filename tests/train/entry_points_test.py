"""The command-line entry points (experiments/train.py, sweep.py; helpers in experiments/cli.py):
configuration errors print one line and leave no workdir, `--help` lists the configs and their
fields, `--show_config` prints the resolved config, and `configs/...` paths work from any directory.

The subprocesses run from a temporary directory, never the repository root; PYTHONPATH points at
the checkout (an installed attnjax ships `experiments` and `configs` as packages, setup.cfg). Every
case exits before anything is compiled, so each takes the seconds of a Python start.
"""

import os
import subprocess
import sys

import ml_collections
import pytest

from experiments import cli
from tests.train import fakes_test


def _run(module, *args, cwd):
  env = {**os.environ, "PYTHONPATH": fakes_test.REPO, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def _listing(path):
  return sorted((p, os.stat(os.path.join(path, p)).st_mtime_ns) for p in os.listdir(path))


@pytest.mark.parametrize("args, message", [
    (["--config=configs/mqar.py:size=huge"], "config argument size='huge': known sizes"),
    (["--config=configs/nope.py"], "no config file 'configs/nope.py'"),
    (["--config=configs/mqar.py", "--config.model.bogus=3"], "no field 'model.bogus'"),
    (["--config=configs/mqar.py", "--config.model.width=abc"], "--config.model.width=abc"),
    (["--config=configs/mqar.py:mechanism=nope"], "model.mechanism: unknown attention mechanism"),
    (["--config=configs/mqar.py", "--config.model.num_heads=6"],
     "model.num_heads (6) must divide model.width (64)"),
    # Raised by the task and the model builder, after validate_config: still before the workdir.
    (["--config=configs/mqar.py:size=tiny", "--config.task.seq_len=7"], "`seq_len`=7"),
    (["--config=configs/mqar.py:size=tiny", "--config.model.arch=bogus"], "model.arch"),
])
def test_train_config_error_is_one_line_and_leaves_no_workdir(args, message, tmp_path):
  out = _run("train", *args, f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
  assert out.returncode == cli.EXIT_CONFIG_ERROR, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("attnjax: config error: "), out.stderr
  assert message in lines[0]
  assert not os.path.exists(tmp_path / "run")


def test_failed_run_leaves_an_existing_workdir_as_it_was(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  before = _listing(workdir)
  out = _run("train", "--config=configs/mqar.py:size=tiny", "--config.model.arch=bogus",
             f"--workdir={workdir}", cwd=tmp_path)
  assert out.returncode == cli.EXIT_CONFIG_ERROR and "model.arch" in out.stderr
  assert _listing(workdir) == before


def test_show_config_resolves_the_schedule_from_num_steps(tmp_path):
  out = _run("train", "--config=configs/mqar.py:size=tiny", "--config.train.num_steps=100",
             "--config.model.num_kv_heads=1", "--show_config", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  lines = [line.strip() for line in out.stdout.splitlines()]
  for line in ("num_steps: 100", "eval_every: 20", "checkpoint_every: 20", "warmup_steps: 10",
               "num_kv_heads: 1", "seq_len: 32"):
    assert line in lines, out.stdout


def test_train_help_lists_the_configs_and_their_fields(tmp_path):
  out = _run("train", "--help", cwd=tmp_path)
  for name in ("mqar", "selective_copy", "induction", "listops", "lm_bytes", "digits_vit"):
    assert f"configs/{name}.py: " in out.stdout, out.stdout
  assert "configs/mqar.py: MQAR (multi-query associative recall;" in out.stdout
  assert "arg: mechanism=<registry name>,size=<tiny|small|base>[,window=<w>]" in out.stdout
  for field in ("num_heads=2", "learning_rate=", "num_steps=1000", "eval_every=None",
                "--show_config"):
    assert field in out.stdout, field
  chosen = _run("train", "--config=configs/mqar.py:size=tiny", "--help", cwd=tmp_path)
  assert "Fields of configs/mqar.py:size=tiny" in chosen.stdout
  assert "num_kv_pairs=4" in chosen.stdout and "width=32" in chosen.stdout


def test_sweep_help_and_config_error(tmp_path):
  out = _run("sweep", "--help", cwd=tmp_path)
  assert "configs/sweeps/mqar_demo.py: The demo sweep" in out.stdout
  out = _run("sweep", "--config=configs/sweeps/mqar_demo.py", "--config.budget=1",
             f"--workdir={tmp_path / 'sweep'}", cwd=tmp_path)
  assert out.returncode == cli.EXIT_CONFIG_ERROR
  assert out.stderr.strip().splitlines() == [
      "attnjax: config error: --config.budget: no field 'budget'; the config has "
      "['budget_tolerance', 'runs']"]
  assert not os.path.exists(tmp_path / "sweep")


def test_check_overrides():
  config = ml_collections.ConfigDict({
      "model": {"width": 8, "kwargs": {}, "heads": ml_collections.config_dict.placeholder(int),
                "untyped": None}})
  cli.check_overrides(config, ["prog", "--config.model.width=4", "--config.model.heads", "2",
                               "--workdir=x"])
  with pytest.raises(ValueError, match="no field 'model.depth'; model has"):
    cli.check_overrides(config, ["--config.model.depth=1"])
  with pytest.raises(ValueError, match="no field 'modle'"):
    cli.check_overrides(config, ["--config.modle.width=1"])
  with pytest.raises(ValueError, match="it is empty: set it whole"):
    cli.check_overrides(config, ["--config.model.kwargs.window=1"])
  with pytest.raises(ValueError, match="None without a declared type"):
    cli.check_overrides(config, ["--config.model.untyped=1"])


def test_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_config_path("configs/mqar.py") == os.path.join(fakes_test.REPO, "configs",
                                                                    "mqar.py")
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "mqar.py").write_text("")
  assert cli.resolve_config_path("configs/mqar.py") == "configs/mqar.py"  # the local file wins
  with pytest.raises(ValueError, match="configs/sweeps/mqar_demo.py"):
    cli.resolve_config_path("configs/sweeps/nope.py", "sweeps")
