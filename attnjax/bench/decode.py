"""Decode benchmark: one decoding step (T = 1) over a contiguous and over a paged KV cache, and cascade
attention against per-row attention when the rows share a prefix.

Paths (`DecodeCase.path`), each jitted as the step `q [B, 1, N, H] -> out [B, 1, N, h]` with the
cache as an argument:

  contiguous  `KVCache` + `kvcache.decode_attention`; split-K on: chunks of `split_tokens` keys,
              off: one chunk (`num_splits=1`).
  paged       `paged_attention` over a shuffled page pool (every row's pages scattered through it):
              `implementation="xla"` with split-K on (`split_tokens / page_size` pages per split) and
              off (the whole table as one split); `"cpu_flash"`, the fused CPU kernel reading the
              pages in place through the table (no split-K: the kernel works over rows and heads).
  per_row     (shared prefix) paged attention over tables whose first pages are the prefix's pages,
              held once in the pool, as copy-on-write prefix sharing leaves them (`xla` split-K, and
              `cpu_flash`).
  cascade     (shared prefix) `cascade_attention`: the prefix attended once for all rows, each row's
              own suffix pages, merged.
  contiguous  (shared prefix) also measured: each row holds its own copy of the prefix.

Time: the cases of a group (one batch size and length, or the shared-prefix setting) are compiled,
warmed up, then run in turn, one call each per round, for `repeats` rounds (a change in the machine's
load falls on every path of the group alike, so their ratios hold better than the absolute times);
the median per case is reported. Tokens/s = B / median step time. Memory: the compiled program's
arguments (the cache, dominant) and temporaries, from `memory_analysis()`; a group whose arguments
would not fit the RAM budget is skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.bench import harness
from attnjax.bench import report
from attnjax.core import kvcache
from attnjax.core import paged_attention as pa

__all__ = ["DecodeCase", "DecodeResult", "cases_from_config", "markdown", "run_benchmark"]

PATHS = ("contiguous", "paged", "per_row", "cascade")
CSV_FIELDS = ("group", "path", "split", "implementation", "B", "L", "prefix", "suffix", "N", "K",
              "H", "page_size", "dtype", "status", "reason", "median_ms", "min_ms", "runs",
              "tokens_per_s", "compile_s", "argument_bytes", "temp_bytes")


@dataclasses.dataclass(frozen=True)
class DecodeCase:
  """One decode step to time. `L`: tokens per row (prefix + suffix in the shared-prefix group)."""
  path: str
  split: bool
  B: int
  L: int
  prefix: int = 0
  N: int = 8
  K: int = 2
  H: int = 64
  page_size: int = 16
  split_tokens: int = 512
  dtype: str = "float32"
  seed: int = 0
  implementation: str = "xla"      # paged and per_row: "xla" or "cpu_flash"

  def __post_init__(self):
    if self.path not in PATHS:
      raise ValueError(f"DecodeCase: unknown path {self.path!r}; expected one of {PATHS}")
    if self.implementation not in ("xla", "cpu_flash") or (
        self.implementation == "cpu_flash" and (self.split or self.path not in ("paged", "per_row"))):
      raise ValueError(f"DecodeCase: implementation {self.implementation!r} with path {self.path!r}, "
                       f"split={self.split}; expected 'xla', or 'cpu_flash' (paged / per_row, no "
                       "split-K)")
    if self.L % self.page_size or self.prefix % self.page_size:
      raise ValueError(f"DecodeCase: L={self.L} and prefix={self.prefix} must be multiples of "
                       f"page_size={self.page_size}")
    if self.path in ("per_row", "cascade") and not self.prefix:
      raise ValueError(f"DecodeCase: path {self.path!r} needs a shared prefix (prefix > 0)")

  @property
  def group(self) -> str:
    return f"prefix{self.prefix}_B{self.B}_L{self.L}" if self.prefix else f"B{self.B}_L{self.L}"

  @property
  def suffix(self) -> int:
    return self.L - self.prefix


@dataclasses.dataclass
class DecodeResult:
  """Times in milliseconds, memory in bytes (None where unknown)."""
  case: DecodeCase
  status: str = "ok"               # "ok", "skipped" or "failed"
  reason: str = ""
  times_ms: tuple[float, ...] = ()
  compile_s: Optional[float] = None
  argument_bytes: Optional[int] = None
  temp_bytes: Optional[int] = None

  @property
  def median_ms(self) -> Optional[float]:
    return statistics.median(self.times_ms) if self.times_ms else None

  @property
  def tokens_per_s(self) -> Optional[float]:
    return self.case.B / (self.median_ms * 1e-3) if self.times_ms else None


# --------------------------------------------------------------------------------------------------
# Building a case


def _arrays(case: DecodeCase):
  """Query `[B, 1, N, H]`, the rows' keys and values `[B, L, K, H]` (the first `prefix` tokens the
  same in every row) and a permutation of the pool's pages (numpy, float32)."""
  rng = np.random.default_rng(case.seed)
  B, L, K, H = case.B, case.L, case.K, case.H
  q = rng.standard_normal((B, 1, case.N, H), dtype=np.float32)
  k = rng.standard_normal((B, L, K, H), dtype=np.float32)
  v = rng.standard_normal((B, L, K, H), dtype=np.float32)
  if case.prefix:
    k[:, :case.prefix], v[:, :case.prefix] = k[:1, :case.prefix], v[:1, :case.prefix]
  return q, k, v, rng


def build(case: DecodeCase) -> tuple[Callable, tuple]:
  """(step, args): `jax.jit(step).lower(*args)` compiles the case's decode step."""
  q, k, v, rng = _arrays(case)
  B, L, ps = case.B, case.L, case.page_size
  dtype = jnp.dtype(case.dtype)
  lengths = jnp.full((B,), L, jnp.int32)
  cast = lambda x: jnp.asarray(x, dtype)
  if case.path == "contiguous":
    cache = kvcache.KVCache(cast(k), cast(v), lengths)
    splits = dict(split_size=case.split_tokens) if case.split else dict(num_splits=1)
    return lambda q, cache: kvcache.decode_attention(q, cache, **splits), (cast(q), cache)
  pps = max(1, case.split_tokens // ps) if case.split else None
  if case.path == "paged":
    pages = L // ps
    order = rng.permutation(B * pages)                   # pool page of row b's j-th page
    table = order.reshape(B, pages).astype(np.int32)
    pool = lambda x: np.empty((B * pages, ps, *x.shape[2:]), np.float32)
    k_pages, v_pages = pool(k), pool(v)
    k_pages[order], v_pages[order] = (x.reshape(B * pages, ps, *x.shape[2:]) for x in (k, v))
    max_pages = table.shape[1]

    def step(q, k_pages, v_pages, table, lengths):
      return pa.paged_attention(q, k_pages, v_pages, table, lengths, q_offset=lengths - 1,
                                pages_per_split=pps if case.split else max_pages,
                                implementation=case.implementation)
    return step, (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(table), lengths)
  # Shared prefix: its pages once (pool pages 0..), then each row's own suffix pages.
  pre, suf = case.prefix // ps, case.suffix // ps
  own = lambda x: x[:, case.prefix:].reshape(B * suf, ps, *x.shape[2:])
  suffix_table = np.arange(B * suf, dtype=np.int32).reshape(B, suf)
  if case.path == "cascade":
    prefix_k, prefix_v = k[0, :case.prefix], v[0, :case.prefix]

    def cascade(q, prefix_k, prefix_v, k_pages, v_pages, table, lengths):
      return pa.cascade_attention(q, prefix_k, prefix_v, k_pages, v_pages, table, lengths,
                                  q_offset=lengths - 1, pages_per_split=pps, implementation="xla")
    return cascade, (cast(q), cast(prefix_k), cast(prefix_v), cast(own(k)), cast(own(v)),
                     jnp.asarray(suffix_table), jnp.full((B,), case.suffix, jnp.int32))
  shared = lambda x: x[0, :case.prefix].reshape(pre, ps, *x.shape[2:])
  k_pages = np.concatenate([shared(k), own(k)])
  v_pages = np.concatenate([shared(v), own(v)])
  table = np.concatenate([np.broadcast_to(np.arange(pre, dtype=np.int32), (B, pre)),
                          pre + suffix_table], axis=1)

  def per_row(q, k_pages, v_pages, table, lengths):
    return pa.paged_attention(q, k_pages, v_pages, table, lengths, q_offset=lengths - 1,
                              pages_per_split=pps, implementation=case.implementation)
  return per_row, (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(table), lengths)


# --------------------------------------------------------------------------------------------------
# Running


def cases_from_config(config) -> list[list[DecodeCase]]:
  """Groups of cases: per (B, L), contiguous and paged (xla) with split-K on and off, and paged by
  cpu_flash; then the shared-prefix group (contiguous, per-row paged by xla and by cpu_flash,
  cascade)."""
  shape = dict(N=config.N, K=config.K, H=config.H, page_size=config.page_size,
               split_tokens=config.split_tokens, dtype=config.dtype, seed=config.seed)
  groups = []
  for B in config.batches:
    for L in config.lengths:
      groups.append([DecodeCase(path, split, B, L, **shape)
                     for path in ("contiguous", "paged") for split in (True, False)]
                    + [DecodeCase("paged", False, B, L, implementation="cpu_flash", **shape)])
  sp = config.get("shared_prefix")
  if sp is not None:
    L = sp.prefix + sp.suffix
    groups.append([DecodeCase(path, True, sp.B, L, prefix=sp.prefix, **shape)
                   for path in ("contiguous", "per_row", "cascade")]
                  + [DecodeCase("per_row", False, sp.B, L, prefix=sp.prefix,
                                implementation="cpu_flash", **shape)])
  return groups


def _compile(case: DecodeCase):
  step, args = build(case)
  start = time.perf_counter()
  compiled = jax.jit(step).lower(*args).compile()
  result = DecodeResult(case, compile_s=time.perf_counter() - start)
  analysis = compiled.memory_analysis()
  if analysis is not None:
    result.argument_bytes = int(analysis.argument_size_in_bytes)
    result.temp_bytes = int(analysis.temp_size_in_bytes)
  return result, (lambda: jax.block_until_ready(compiled(*args)))


def run_group(cases: Sequence[DecodeCase], *, warmup: int, repeats: int,
              budget_bytes: int) -> list[DecodeResult]:
  """Compiles every case of the group, then times them round-robin (module docstring)."""
  results, steps = [], []
  for case in cases:
    try:
      result, step = _compile(case)
      need = (result.argument_bytes or 0) + (result.temp_bytes or 0)
      if not harness.fits(need, budget_bytes):
        result.status = "skipped"
        result.reason = (f"would need {need / harness.GB:.1f} GB (budget "
                         f"{budget_bytes / harness.GB:.1f} GB)")
        step = None
    except Exception as e:  # pylint: disable=broad-except  (a failing path must not stop the run)
      result, step = DecodeResult(case, "failed", f"{type(e).__name__}: {e}".splitlines()[0]), None
    results.append(result)
    steps.append(step)
  live = [(r, s) for r, s in zip(results, steps, strict=True) if s is not None]
  for _, step in live:
    for _ in range(warmup):
      step()
  times = {id(r): [] for r, _ in live}
  for _ in range(repeats):
    for result, step in live:
      start = time.perf_counter()
      step()
      times[id(result)].append((time.perf_counter() - start) * 1e3)
  for result, _ in live:
    result.times_ms = tuple(times[id(result)])
  return results


def run_benchmark(config, workdir: str, *,
                  log: Callable[[str], None] = print) -> list[DecodeResult]:
  """Runs every group of `config` (configs/bench/decode.py) and writes `results.csv` and `results.md`
  under `workdir` after each group (a partial run is kept)."""
  os.makedirs(workdir, exist_ok=True)
  env = report.environment()
  groups = cases_from_config(config)
  log(f"{len(groups)} groups; {env}")
  done: list[DecodeResult] = []
  for i, cases in enumerate(groups):
    budget = harness.memory_budget_bytes(config.get("memory_fraction", 0.75))
    results = run_group(cases, warmup=config.warmup, repeats=config.repeats, budget_bytes=budget)
    done += results
    for r in results:
      figure = (f"{r.median_ms:.2f} ms, {r.tokens_per_s:.0f} tok/s" if r.times_ms else r.reason)
      log(f"[{i + 1}/{len(groups)}] {r.case.group:22s} {r.case.path:10s} "
          f"{r.case.implementation:9s} split={'on ' if r.case.split else 'off'} {r.status}: "
          f"{figure}")
    write_csv(done, os.path.join(workdir, "results.csv"))
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(markdown(done, env=env) + "\n")
    gc.collect()
  return done


# --------------------------------------------------------------------------------------------------
# Reporting


def write_csv(results: Sequence[DecodeResult], path: str) -> None:
  """One row per result with the columns `CSV_FIELDS`."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in results:
      c = r.case
      row = dict(group=c.group, path=c.path, split=c.split, implementation=c.implementation, B=c.B,
                 L=c.L, prefix=c.prefix, suffix=c.suffix if c.prefix else "", N=c.N, K=c.K,
                 H=c.H, page_size=c.page_size, dtype=c.dtype, status=r.status, reason=r.reason,
                 median_ms=r.median_ms,
                 min_ms=min(r.times_ms) if r.times_ms else None, runs=len(r.times_ms),
                 tokens_per_s=r.tokens_per_s, compile_s=r.compile_s,
                 argument_bytes=r.argument_bytes, temp_bytes=r.temp_bytes)
      writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                       for k, v in row.items()})


def _cell(r: Optional[DecodeResult]) -> str:
  if r is None:
    return "—"
  if not r.times_ms:
    return f"{r.status}: {r.reason}"
  ms = r.median_ms
  return f"{report.format_ms(ms) if ms >= 10 else f'{ms:.2f} ms'} ({r.tokens_per_s:,.0f} tok/s)"


def _ratio(a: Optional[DecodeResult], b: Optional[DecodeResult]) -> str:
  if a is None or b is None or not a.times_ms or not b.times_ms:
    return "—"
  return f"{a.median_ms / b.median_ms:.2f}×"


# The grid's columns: (path, split-K on, implementation) in table order, and their headers.
_GRID = (("contiguous", True, "xla"), ("contiguous", False, "xla"), ("paged", True, "xla"),
         ("paged", False, "xla"), ("paged", False, "cpu_flash"))
_GRID_HEADERS = ("contiguous, split-K", "contiguous, one chunk", "paged xla, split-K",
                 "paged xla, one split", "paged cpu_flash")


def _table(header: Sequence[str], align: str) -> list[str]:
  return ["| " + " | ".join(header) + " |", "| " + " | ".join([align] * len(header)) + " |"]


def markdown(results: Sequence[DecodeResult], env: Optional[str] = None) -> str:
  """The decode table (time and tokens/s per path, paged / contiguous ratios), its memory table, and
  the shared-prefix table (cascade / per-row)."""
  lines = [] if env is None else [f"Environment: {env}", ""]
  grid = [r for r in results if not r.case.prefix]
  by = {(r.case.B, r.case.L, r.case.path, r.case.split, r.case.implementation): r for r in grid}
  keys = list(dict.fromkeys((r.case.B, r.case.L) for r in grid))
  if keys:
    lines += ["**Decode step, T = 1: median time (tokens/s)**", ""]
    lines += _table(("B", "L", *_GRID_HEADERS, "paged / contiguous, split-K (xla)",
                     "paged / contiguous, one chunk (xla)", "paged cpu_flash / contiguous one chunk",
                     "best paged / best contiguous"), "---:")
    for B, L in keys:
      row = {key: by.get((B, L, *key)) for key in _GRID}
      best = lambda path, row=row: min(
          (r for (p, _, _), r in row.items() if p == path and r is not None and r.times_ms),
          key=lambda r: r.median_ms, default=None)
      cells = [_cell(row[key]) for key in _GRID]
      ratios = [_ratio(row["paged", True, "xla"], row["contiguous", True, "xla"]),
                _ratio(row["paged", False, "xla"], row["contiguous", False, "xla"]),
                _ratio(row["paged", False, "cpu_flash"], row["contiguous", False, "xla"]),
                _ratio(best("paged"), best("contiguous"))]
      lines.append(f"| {B} | {L} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "**Memory of the compiled step: arguments (the cache) / temporaries**", ""]
    lines += _table(("B", "L", *_GRID_HEADERS), "---:")
    for B, L in keys:
      cells = [by.get((B, L, *key)) for key in _GRID]
      lines.append(f"| {B} | {L} | " + " | ".join(
          "—" if r is None else f"{report.format_bytes(r.argument_bytes)} / "
          f"{report.format_bytes(r.temp_bytes)}" for r in cells) + " |")
  shared = [r for r in results if r.case.prefix]
  if shared:
    per_row = {r.case.group: r for r in shared
               if r.case.path == "per_row" and r.case.implementation == "xla"}
    lines += ["", "**Rows sharing a prefix: one decode step**", ""]
    lines += _table(("B", "prefix", "suffix", "path", "median time (tokens/s)", "arguments",
                     "temporaries", "time / per-row paged (xla)"), "---:")
    for r in shared:
      c = r.case
      path = c.path if c.path in ("contiguous", "cascade") else f"{c.path} ({c.implementation})"
      lines.append(f"| {c.B} | {c.prefix} | {c.suffix} | {path} | {_cell(r)} | "
                   f"{report.format_bytes(r.argument_bytes)} | {report.format_bytes(r.temp_bytes)} | "
                   f"{_ratio(r, per_row.get(c.group))} |")
  return "\n".join(lines)
