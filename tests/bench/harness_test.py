"""Smoke tests of the benchmark harness: a tiny grid end to end, and the memory-skip rule."""

import csv
import itertools
import os

import jax
import ml_collections
import numpy as np
import pytest

from attnjax.bench import harness
from attnjax.bench import peers
from tests import tolerances


def _tiny_config():
  config = ml_collections.ConfigDict()
  config.B, config.N, config.H, config.dtype, config.seed = 1, 2, 16, "float32", 0
  config.modes = ("fwd", "fwd+bwd")
  config.masks = ("window16", "documents32")
  config.seq_lens = (64,)
  config.peers = ("xla", "reference", "jax_nn")
  config.warmup, config.repeats, config.min_repeats = 1, 2, 1
  config.max_case_seconds = None
  config.memory_fraction = 0.75
  config.memory_budget_gb = None
  config.block_size = (32, 32)
  config.extra_cases = [ml_collections.ConfigDict(dict(
      peers=("xla",), mask="none", T=96, mode="fwd", warmup=0, repeats=1))]
  return config


def test_tiny_benchmark_writes_outputs(tmp_path):
  from attnjax.core import flex
  blocks_before = dict(flex.DEFAULT_BLOCK)
  results = harness.run_benchmark(_tiny_config(), str(tmp_path), log=lambda _: None)
  assert flex.DEFAULT_BLOCK == blocks_before            # the tile override is undone
  for name in ("results.csv", "results.md", "time.png", "memory.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  assert len(results) == 2 * 2 * 3 + 1
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(results)
  for row in rows:
    assert row["status"] == "ok", row
    assert float(row["median_ms"]) > 0
    assert int(row["runs"]) == (1 if row["T"] == "96" else 2)
    assert int(row["temp_bytes"]) >= 0
    assert int(row["total_bytes"]) >= int(row["argument_bytes"]) > 0
    if row["peer"] == "jax_nn":
      assert float(row["time_vs_jax_nn"]) == pytest.approx(1.0)
  table = (tmp_path / "results.md").read_text()
  assert "| fwd+bwd | documents32 | 64 |" in table
  assert "jax.nn" in table and "attnjax xla" in table


def test_case_over_budget_is_skipped_with_its_memory():
  case = peers.Case("reference", "causal", 64, "fwd+bwd", N=2, H=16)
  result = harness.measure(case, budget_bytes=1)
  assert result.status == "skipped"
  assert result.reason.startswith("would need")
  assert result.total_bytes > 1 and result.temp_bytes > 0
  assert result.times_ms == ()
  assert harness.fits(result.total_bytes, result.total_bytes)
  assert not harness.fits(result.total_bytes, result.total_bytes - 1)


def test_memory_budget_is_below_total_ram():
  total, available = harness.read_meminfo()
  assert 0 < available <= total
  assert harness.memory_budget_bytes(0.5) <= 0.5 * total


def test_time_runs_caps_slow_cases():
  ticks = itertools.count(step=10.0)          # every clock read advances 10 s: one run = 10 s
  calls = []
  times = harness.time_runs(lambda: calls.append(1), warmup=1, repeats=5, min_repeats=2,
                            max_case_seconds=25, clock=lambda: next(ticks))
  assert len(times) == 2 and len(calls) == 3
  assert len(harness.time_runs(lambda: None, warmup=0, repeats=3)) == 3


def test_document_segment_ids_and_masks():
  seg = peers.document_segment_ids(2, 4096, 512, seed=0)
  assert seg.shape == (2, 4096)
  assert np.all(np.diff(seg, axis=1) >= 0)
  lengths = np.bincount(seg[0])[:-1]                # the last document is cut at T
  assert 256 <= lengths.min() and lengths.max() <= 768
  assert peers.parse_mask("window256") == ("window", 256)
  with pytest.raises(ValueError, match="unknown mask"):
    peers.parse_mask("window")
  with pytest.raises(ValueError, match="unknown peer"):
    peers.Case("flash", "causal", 64)


@pytest.mark.parametrize("mask", ["causal", "none"])
def test_linear_peers_compute_the_same_attention(mask):
  """The three linear peers time the same computation (outputs and gradients agree)."""
  outs = {}
  for peer in peers.LINEAR_PEERS:
    fn, args = peers.build_jax(peers.Case(peer=peer, mask=mask, T=40, N=2, H=8))
    outs[peer] = fn(*args)
  for peer in ("linear_xla", "linear_parallel"):
    for a, b in zip(outs[peer], outs["linear_reference"], strict=True):
      assert tolerances.rel_rms(a, b) < tolerances.GRAD_REL_RMS[np.float32]


def test_linear_peers_skip_other_masks():
  result = harness.measure(peers.Case(peer="linear_xla", mask="window16", T=32, N=2, H=8),
                           budget_bytes=10**9)
  assert result.status == "skipped" and "causal and none" in result.reason


def test_mechanism_peers_run_registered_mechanisms_with_their_arrays():
  """`mech:<name>` runs the registered mechanism (learned arrays at their init, per-token inputs
  zero before their activation) on the causal and none masks; other masks are skipped."""
  case = peers.Case("mech:lexicon_film_attention", "causal", 24, "fwd", N=2, H=8,
                    kwargs=())
  fn, args = peers.build_jax(case)
  out = jax.jit(fn)(*args)
  assert out.shape == (1, 24, 2, 8) and np.isfinite(np.asarray(out)).all()
  result = harness.measure(peers.Case("mech:cog_attention", "none", 16, "fwd+bwd", N=2, H=8,
                                      warmup=0, repeats=1), budget_bytes=1 << 30)
  assert result.status == "ok"
  skipped = harness.measure(peers.Case("mech:cog_attention", "window8", 16, "fwd", N=2, H=8),
                            budget_bytes=1 << 30)
  assert skipped.status == "skipped" and "causal and none" in skipped.reason
  assert peers.label("mech:cog_attention") == "cog_attention"
