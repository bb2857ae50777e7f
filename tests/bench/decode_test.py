"""Smoke tests of the decode benchmark: every path of a group computes the same decode step on the
same tokens, and a tiny grid runs end to end and writes its tables."""

import csv

import jax
import ml_collections
import numpy as np

from attnjax.bench import decode
from attnjax.kernels.cpu import flash
from tests import tolerances


def _tiny_config():
  config = ml_collections.ConfigDict()
  config.benchmark = "decode"
  config.batches, config.lengths = (3,), (64,)
  config.N, config.K, config.H, config.page_size, config.split_tokens = 4, 2, 16, 16, 32
  config.dtype, config.seed = "float32", 0
  config.warmup, config.repeats = 1, 2
  config.memory_fraction = 0.75
  config.shared_prefix = ml_collections.ConfigDict(dict(B=3, prefix=32, suffix=16))
  return config


def test_paths_of_a_group_compute_the_same_step():
  for cases in decode.cases_from_config(_tiny_config()):
    outs = [np.asarray(jax.jit(step)(*args)) if case.implementation == "xla" or flash.available()
            else None for case, (step, args) in zip(cases, map(decode.build, cases), strict=True)]
    for case, out in zip(cases[1:], outs[1:], strict=True):
      if case.implementation == "cpu_flash" and not flash.available():
        continue
      np.testing.assert_allclose(out, outs[0], err_msg=f"{case}",
                                 **tolerances.output(np.float32))


def test_tiny_benchmark_writes_outputs(tmp_path):
  results = decode.run_benchmark(_tiny_config(), str(tmp_path), log=lambda _: None)
  assert len(results) == 5 + 4
  # cpu_flash cases fail (and say why) only where the kernel library is not built.
  assert all((r.status == "ok" and len(r.times_ms) == 2) or (
      r.case.implementation == "cpu_flash" and not flash.available()) for r in results), results
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(results)
  assert all(float(row["tokens_per_s"]) > 0 and int(row["argument_bytes"]) > 0 for row in rows
             if row["status"] == "ok")
  table = (tmp_path / "results.md").read_text()
  assert "| 3 | 64 |" in table and "| 3 | 32 | 16 | cascade |" in table
