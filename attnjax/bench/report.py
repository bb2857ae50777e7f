"""Benchmark output: CSV, markdown tables (times and temporary memory, each with its ratio to
`jax.nn.dot_product_attention` in the same run; optionally TFLOP/s in the FlashAttention convention,
`peers.attention_flops`) and PNG plots."""

from __future__ import annotations

import csv
import os
import platform
from typing import Optional, Sequence

import jax

from attnjax.bench import peers as peers_lib

CSV_FIELDS = ("mode", "mask", "T", "B", "N", "H", "dtype", "peer", "status", "reason",
              "median_ms", "min_ms", "runs", "compile_s", "temp_bytes", "argument_bytes",
              "output_bytes", "total_bytes", "time_vs_jax_nn", "temp_vs_jax_nn", "K", "tflops")
BASELINE = "jax_nn"


def cpu_model() -> str:
  """The CPU's model name, for the environment line of a report."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment(block: Optional[tuple[int, int]] = None) -> str:
  """One line naming the machine and library versions."""
  parts = [f"{jax.default_backend()} ({cpu_model()}, {os.cpu_count()} cores)",
           f"jax {jax.__version__}"]
  if peers_lib.torch_available():
    import torch  # pylint: disable=g-import-not-at-top
    parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  if block is not None:
    parts.append(f"attnjax xla tiles {block[0]}x{block[1]}")
  return ", ".join(parts)


def _group_key(case):
  return (case.mode, case.mask, case.T, case.B, case.N, case.kv_heads, case.H)


def tflops_per_second(result) -> Optional[float]:
  """TFLOP/s of a timed result (`peers.attention_flops` over the median time); None if not run."""
  if not result.median_ms:
    return None
  return peers_lib.attention_flops(result.case) / (result.median_ms * 1e-3) / 1e12


def _baselines(results):
  """{(mode, mask, T, B, N, K, H): jax.nn Result}."""
  return {_group_key(r.case): r for r in results if r.case.peer == BASELINE}


def _ratio(value, base) -> Optional[float]:
  if value is None or base is None or base == 0:
    return None
  return value / base


def rows(results) -> list[dict]:
  """One dict per result with the CSV fields."""
  base = _baselines(results)
  out = []
  for r in results:
    c, b = r.case, base.get(_group_key(r.case))
    out.append(dict(
        mode=c.mode, mask=c.mask, T=c.T, B=c.B, N=c.N, H=c.H, dtype=c.dtype, peer=c.peer,
        status=r.status, reason=r.reason, median_ms=r.median_ms,
        min_ms=min(r.times_ms) if r.times_ms else None, runs=len(r.times_ms),
        compile_s=r.compile_s, temp_bytes=r.temp_bytes, argument_bytes=r.argument_bytes,
        output_bytes=r.output_bytes, total_bytes=r.total_bytes,
        time_vs_jax_nn=_ratio(r.median_ms, b.median_ms if b else None),
        temp_vs_jax_nn=_ratio(r.temp_bytes, b.temp_bytes if b else None), K=c.kv_heads,
        tflops=tflops_per_second(r)))
  return out


def write_csv(results, path: str) -> None:
  """Writes one row per result with the columns `CSV_FIELDS`."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows(results):
      writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                       for k, v in row.items()})


def format_bytes(n: Optional[int]) -> str:
  """`n` bytes in kB, MB or GB (decimal units); "n/a" for None."""
  if n is None:
    return "n/a"
  if n >= 1e9:
    return f"{n / 1e9:.2f} GB"
  if n >= 1e6:
    return f"{n / 1e6:.1f} MB"
  return f"{n / 1e3:.1f} kB"


def format_ms(ms: float) -> str:
  """A duration in ms, or in s from 10 s on."""
  return f"{ms / 1e3:.2f} s" if ms >= 1e4 else f"{ms:.1f} ms"


def _present_peers(results):
  seen = {r.case.peer for r in results}
  return [p for p in peers_lib.PEERS if p in seen] + sorted(
      p for p in seen if peers_lib.is_mechanism_peer(p))


def _groups(results):
  """[(key, {peer: Result})] in the order of first appearance."""
  groups: dict = {}
  for r in results:
    groups.setdefault(_group_key(r.case), {})[r.case.peer] = r
  return list(groups.items())


def markdown(results: Sequence, env: Optional[str] = None, tflops: bool = False) -> str:
  """Two tables: median time and temporary memory per peer, with the ratio to jax.nn in brackets;
  with `tflops` a third, TFLOP/s per peer. A shape column (B, N, K, H) appears when shapes vary."""
  peer_names = _present_peers(results)
  base = _baselines(results)
  show_shape = len({_group_key(r.case)[3:] for r in results}) > 1
  shape_head, shape_rule = ("B×N/K×H | ", "---: | ") if show_shape else ("", "")
  header = ("| mode | mask | T | " + shape_head + " | ".join(peers_lib.label(p) for p in peer_names)
            + " |")
  rule = "| --- | --- | ---: | " + shape_rule + " | ".join("---:" for _ in peer_names) + " |"
  notes: dict[str, int] = {}

  def note(text):
    notes.setdefault(text, len(notes) + 1)
    return f"[{notes[text]}]"

  def time_cell(r, b):
    if r is None:
      return "—"
    if r.status == "failed":
      return "failed " + note(r.reason)
    if r.status == "skipped":
      if r.reason.startswith("would need"):
        return "skipped: needs " + format_bytes(r.total_bytes)
      return "skipped " + note(r.reason)
    cell = format_ms(r.median_ms)
    ratio = _ratio(r.median_ms, b.median_ms if b else None)
    if ratio is not None:
      cell += f" ({ratio:.2f}×)"
    if len(r.times_ms) < r.case.repeats:
      cell += " " + note("fewer timed runs than configured (per-case time cap); see `runs` in CSV")
    return cell

  def memory_cell(r, b):
    if r is None or r.temp_bytes is None:
      return "—" if r is None else "n/a"
    cell = format_bytes(r.temp_bytes)
    ratio = _ratio(r.temp_bytes, b.temp_bytes if b else None)
    if ratio is not None:
      cell += f" ({ratio:.3f}×)"
    if r.status == "skipped":
      cell += " (not run)"
    return cell

  def tflops_cell(r, b):
    del b
    if r is None:
      return "—"
    value = tflops_per_second(r)
    return r.status if value is None else (f"{value:.1f}" if value >= 1 else f"{value:.3f}")

  tables = [("Median time (ratio to jax.nn)", time_cell),
            ("Temporary memory from the compiled executable (ratio to jax.nn)", memory_cell)]
  if tflops:
    tables.append(("TFLOP/s (FlashAttention convention: 4·B·N·T²·H forward, ×½ causal, ×3.5 "
                   "forward+backward)", tflops_cell))
  lines = []
  if env:
    lines += [f"Machine: {env}.", ""]
  for title, cell in tables:
    lines += [f"**{title}**", "", header, rule]
    for key, by_peer in _groups(results):
      mode, mask, T, B, N, K, H = key
      shape = f"{B}×{N}/{K}×{H} | " if show_shape else ""
      cells = [cell(by_peer.get(p), base.get(key)) for p in peer_names]
      lines.append(f"| {mode} | {mask} | {T} | {shape}" + " | ".join(cells) + " |")
    lines.append("")
  if notes:
    lines += [f"[{i}] {text}" for text, i in notes.items()] + [""]
  return "\n".join(lines)


def write_markdown(results, path: str, env: Optional[str] = None, tflops: bool = False) -> None:
  """Writes `markdown(results, env=env, tflops=tflops)` to `path`."""
  with open(path, "w") as f:
    f.write(markdown(results, env=env, tflops=tflops))


def plot(results: Sequence, workdir: str) -> list[str]:
  """`time.png` (median time vs T) and `memory.png` (temporary memory vs T; hollow markers: cases
  not run for lack of memory), one panel per (mode, mask). Returns the paths written."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  modes = [m for m in peers_lib.MODES if any(r.case.mode == m for r in results)]
  mask_names = list(dict.fromkeys(r.case.mask for r in results))
  peer_names = _present_peers(results)
  paths = []
  for name, value, ylabel in (("time", lambda r: r.median_ms, "median time (ms)"),
                              ("memory", lambda r: None if r.temp_bytes is None
                               else r.temp_bytes / 1e9, "temporary memory (GB)")):
    fig, axes = plt.subplots(len(modes), len(mask_names), squeeze=False,
                             figsize=(3.6 * len(mask_names), 3.2 * len(modes)))
    for i, mode in enumerate(modes):
      for j, mask in enumerate(mask_names):
        ax = axes[i][j]
        for k, peer in enumerate(peer_names):
          pts = sorted((r.case.T, value(r), r.status == "ok") for r in results
                       if r.case.mode == mode and r.case.mask == mask and r.case.peer == peer
                       and value(r) is not None)
          if not pts:
            continue
          color = f"C{k}"
          ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color,
                  label=peers_lib.label(peer))
          for T, y, ran in pts:
            ax.plot(T, y, "o", color=color, markerfacecolor=color if ran else "none")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{mode}, {mask}", fontsize=9)
        ax.set_xlabel("T")
        if j == 0:
          ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
      for h, l in zip(*ax.get_legend_handles_labels(), strict=True):
        if l not in labels:
          handles.append(h)
          labels.append(l)
    if labels:   # none when every case was skipped or failed (a benchmark on the wrong machine)
      fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = os.path.join(workdir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
