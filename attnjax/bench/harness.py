"""Timing and memory harness: one case at a time, side by side in one run.

For a JAX peer a case is jitted, lowered and compiled; its memory comes from the compiled
executable's `memory_analysis()` (arguments + outputs + temporaries − aliased; "temporary memory" is
the temp figure). A case whose total would not fit in the memory budget (a fraction of this
machine's RAM, see `memory_budget_bytes`) is not executed and is reported as skipped with the
memory it would need. Otherwise it runs `warmup` times, then `repeats` timed runs with
`block_until_ready`; the median is reported. Expensive cases are capped: when `repeats` runs would
take longer than `max_case_seconds`, fewer are made (never fewer than `min_repeats`), and the CSV
records how many. A peer can also be limited to `T <= max_T` (compiled and analysed, not run).

PyTorch peers run on CPU in the same process; their memory is not analysed (a compiled-executable
analysis does not exist there), only estimated from their arguments to decide whether to run.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import jax

from attnjax.bench import peers as peers_lib
from attnjax.bench import report
from attnjax.bench.peers import Case, CaseSkipped
from attnjax.core import flex

GB = 1e9


@dataclasses.dataclass
class Result:
  """The outcome of one case. Times in milliseconds, memory in bytes (None where unknown)."""
  case: Case
  status: str                      # "ok", "skipped" or "failed"
  reason: str = ""
  times_ms: tuple[float, ...] = ()
  compile_s: Optional[float] = None
  temp_bytes: Optional[int] = None
  argument_bytes: Optional[int] = None
  output_bytes: Optional[int] = None
  alias_bytes: Optional[int] = None

  @property
  def median_ms(self) -> Optional[float]:
    return statistics.median(self.times_ms) if self.times_ms else None

  @property
  def total_bytes(self) -> Optional[int]:
    parts = (self.temp_bytes, self.argument_bytes, self.output_bytes)
    if any(p is None for p in parts):
      return None
    return sum(parts) - (self.alias_bytes or 0)


# --------------------------------------------------------------------------------------------------
# Memory


def read_meminfo(path: str = "/proc/meminfo") -> tuple[int, int]:
  """(total, available) RAM in bytes; from os.sysconf where /proc/meminfo is missing."""
  try:
    fields = {}
    with open(path) as f:
      for line in f:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    total = fields["MemTotal"]
    return total, fields.get("MemAvailable", total)
  except (OSError, KeyError, ValueError):
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, total


def memory_budget_bytes(fraction: float = 0.75, reserve_gb: float = 2.0) -> int:
  """What one case may use: `fraction` of total RAM, and no more than what is available now minus
  `reserve_gb` (other processes share the machine)."""
  total, available = read_meminfo()
  return int(min(total * fraction, available - reserve_gb * GB))


def fits(need_bytes: Optional[int], budget_bytes: int) -> bool:
  """Whether a case needing `need_bytes` (None: unknown) fits the memory budget."""
  return need_bytes is None or need_bytes <= budget_bytes


def _skip_reason(need_bytes: int, budget_bytes: int) -> str:
  return f"would need {need_bytes / GB:.1f} GB (budget {budget_bytes / GB:.1f} GB)"


# --------------------------------------------------------------------------------------------------
# Timing


def time_runs(step: Callable[[], object], *, warmup: int, repeats: int, min_repeats: int = 3,
              max_case_seconds: Optional[float] = None, clock=time.perf_counter) -> list[float]:
  """Runs `step` `warmup` times, then times up to `repeats` runs (milliseconds).

  With `max_case_seconds`, the number of timed runs drops to fit that budget after the first timed
  run shows how long one takes, but not below `min_repeats` (nor above `repeats`).
  """
  for _ in range(warmup):
    step()
  times = []
  target = repeats
  while len(times) < target:
    start = clock()
    step()
    times.append((clock() - start) * 1e3)
    if len(times) == 1 and max_case_seconds is not None:
      affordable = int(max_case_seconds * 1e3 // max(times[0], 1e-6))
      target = max(min(repeats, min_repeats), min(repeats, affordable))
  return times


def measure(case: Case, *, budget_bytes: int, min_repeats: int = 3,
            max_case_seconds: Optional[float] = None) -> Result:
  """Compiles (JAX) or builds (PyTorch) `case`, checks its memory against the budget, times it."""
  try:
    if peers_lib.is_jax_peer(case.peer):
      return _measure_jax(case, budget_bytes, min_repeats, max_case_seconds)
    return _measure_torch(case, budget_bytes, min_repeats, max_case_seconds)
  except CaseSkipped as e:
    return Result(case, "skipped", str(e))
  except Exception as e:  # pylint: disable=broad-except  (a failing peer must not stop the run)
    return Result(case, "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  finally:
    gc.collect()


def _measure_jax(case, budget_bytes, min_repeats, max_case_seconds) -> Result:
  fn, args = peers_lib.build_jax(case)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  result = Result(case, "ok", compile_s=compile_s)
  if analysis is not None:
    result.temp_bytes = int(analysis.temp_size_in_bytes)
    result.argument_bytes = int(analysis.argument_size_in_bytes)
    result.output_bytes = int(analysis.output_size_in_bytes)
    result.alias_bytes = int(analysis.alias_size_in_bytes)
  if not fits(result.total_bytes, budget_bytes):
    result.status, result.reason = "skipped", _skip_reason(result.total_bytes, budget_bytes)
    return result
  if case.max_T is not None and case.T > case.max_T:
    result.status, result.reason = "skipped", f"not run: {case.peer} limited to T <= {case.max_T}"
    return result
  step = lambda: jax.block_until_ready(compiled(*args))
  result.times_ms = tuple(time_runs(step, warmup=case.warmup, repeats=case.repeats,
                                    min_repeats=min_repeats, max_case_seconds=max_case_seconds))
  return result


def _measure_torch(case, budget_bytes, min_repeats, max_case_seconds) -> Result:
  if case.max_T is not None and case.T > case.max_T:
    raise CaseSkipped(f"not run: {case.peer} limited to T <= {case.max_T}")
  built = peers_lib.build_torch(case)
  result = Result(case, "ok", argument_bytes=built.argument_bytes, output_bytes=built.output_bytes)
  need = built.argument_bytes + built.output_bytes
  if not fits(need, budget_bytes):
    result.status, result.reason = "skipped", _skip_reason(need, budget_bytes)
    return result
  # The first call compiles (torch.compile) or warms up; it counts as compile time.
  start = time.perf_counter()
  built.step()
  result.compile_s = time.perf_counter() - start
  result.times_ms = tuple(time_runs(built.step, warmup=max(0, case.warmup - 1),
                                    repeats=case.repeats, min_repeats=min_repeats,
                                    max_case_seconds=max_case_seconds))
  return result


# --------------------------------------------------------------------------------------------------
# A whole benchmark


def cases_from_config(config) -> list[Case]:
  """The grid (modes × masks × T × peers) followed by `config.extra_cases`; PyTorch peers are left
  out when torch is not importable."""
  have_torch = peers_lib.torch_available()
  keep = lambda peer: peer not in peers_lib.TORCH_PEERS or have_torch
  max_t = dict(config.get("peer_max_T") or {})
  common = dict(B=config.B, N=config.N, H=config.H, K=config.get("K"), dtype=config.dtype,
                seed=config.seed)
  mech_kwargs = dict(config.get("mechanism_kwargs") or {})
  kw = lambda peer: tuple(sorted((name, tuple(x) if isinstance(x, list) else x)
                                 for name, x in dict(mech_kwargs.get(peer) or {}).items()))
  cases = []
  for mode in config.modes:
    for mask in config.masks:
      for T in config.seq_lens:
        cases += [Case(peer, mask, T, mode, warmup=config.warmup, repeats=config.repeats,
                       max_T=max_t.get(peer), kwargs=kw(peer), **common)
                  for peer in config.peers if keep(peer)]
  for extra in config.get("extra_cases", ()):
    # An extra case may set its own shape (B, N, H, K), e.g. a grid at a fixed number of tokens.
    shape = {**common, **{f: extra[f] for f in ("B", "N", "H", "K") if f in extra}}
    cases += [Case(peer, extra.mask, extra.T, extra.mode, warmup=extra.get("warmup", config.warmup),
                   repeats=extra.get("repeats", config.repeats), max_T=max_t.get(peer),
                   kwargs=kw(peer), **shape)
              for peer in extra.peers if keep(peer)]
  return cases


def run_cases(cases: Iterable[Case], *, budget_bytes: Optional[int] = None,
              memory_fraction: float = 0.75, min_repeats: int = 3,
              max_case_seconds: Optional[float] = None,
              on_result: Optional[Callable[[Result], None]] = None) -> list[Result]:
  """Measures `cases` in order. Without `budget_bytes`, each case's budget is
  `memory_budget_bytes(memory_fraction)` read just before it runs."""
  results = []
  for case in cases:
    budget = memory_budget_bytes(memory_fraction) if budget_bytes is None else budget_bytes
    result = measure(case, budget_bytes=budget, min_repeats=min_repeats,
                     max_case_seconds=max_case_seconds)
    results.append(result)
    if on_result is not None:
      on_result(result)
  return results


def run_benchmark(config, workdir: str, *, log: Callable[[str], None] = print) -> list[Result]:
  """Runs the benchmark described by `config` and writes `results.csv`, `results.md`, `time.png` and
  `memory.png` under `workdir` (the CSV and markdown after every case, so a partial run is kept).

  Config fields: B, N, H, dtype, seed, modes, masks, seq_lens, peers, warmup, repeats, min_repeats,
  max_case_seconds (None: no cap), peer_max_T ({peer: T}: larger T is compiled and its memory
  analysed but not run), memory_fraction, memory_budget_gb (None: from RAM), block_size
  (None: attnjax's default tiles on this platform, else `(block_q, block_kv)` for the xla path),
  extra_cases (list of {peer list `peers`, mask, T, mode, optional warmup/repeats and shape B, N, H,
  K}), K (key/value heads, None: N), report_tflops (add a TFLOP/s table to results.md).
  """
  os.makedirs(workdir, exist_ok=True)
  block_size = config.get("block_size")
  saved_blocks = dict(flex.DEFAULT_BLOCK)
  if block_size:
    flex.DEFAULT_BLOCK[jax.default_backend()] = tuple(int(b) for b in block_size)
  env = report.environment(block=flex.default_block_size(jax.default_backend()))
  budget_gb = config.get("memory_budget_gb")
  cases = cases_from_config(config)
  log(f"{len(cases)} cases; {env}")
  done: list[Result] = []

  def on_result(result: Result):
    done.append(result)
    c = result.case
    figure = (f"{result.median_ms:.1f} ms x{len(result.times_ms)}" if result.times_ms
              else result.reason)
    memory = "" if result.temp_bytes is None else f", temp {result.temp_bytes / GB:.3f} GB"
    log(f"[{len(done)}/{len(cases)}] {c.mode:7s} {c.mask:12s} T={c.T:<6d} {c.peer:10s} "
        f"{result.status}: {figure}{memory}")
    report.write_csv(done, os.path.join(workdir, "results.csv"))
    report.write_markdown(done, os.path.join(workdir, "results.md"), env=env,
                          tflops=config.get("report_tflops", False))

  try:
    results = run_cases(
        cases, budget_bytes=None if budget_gb is None else int(budget_gb * GB),
        memory_fraction=config.get("memory_fraction", 0.75),
        min_repeats=config.get("min_repeats", 3), max_case_seconds=config.get("max_case_seconds"),
        on_result=on_result)
  finally:
    flex.DEFAULT_BLOCK.clear()
    flex.DEFAULT_BLOCK.update(saved_blocks)
  report.plot(results, workdir)
  return results


def summarize(results: Sequence[Result]) -> str:
  """The markdown table of `results`."""
  return report.markdown(results)
