"""Tile sweep for the GPU flex attention kernels: times `flex_attention(implementation=...)` at one
shape for each candidate tile setting, so the best can go into the tile table
(`attnjax/kernels/platform.py`, `BLOCK_SIZES`, keyed by kernel, device kind, head dim and dtype).

  python -m experiments.gpu_tiles --out=/tmp/tiles.csv

For each candidate the table's row for this device is replaced, the function re-traced and compiled,
run `--warmup` times and timed `--repeats` times (median, wall clock around `block_until_ready`).
`pallas_triton` is timed forward and forward+backward (its forward and backward kernels share the
tile); `pallas_mosaic_gpu` forward only (its backward is the Triton one). Prints one CSV row per
(kernel, tile, mode) with ms and TFLOP/s (FlashAttention convention, `attention_flops`), and writes
them to `--out`. Needs a CUDA GPU (about a minute on an H100 / H200).
"""

import csv
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.bench import harness
from attnjax.core import flex
from attnjax.core import masks
from attnjax.kernels import platform

_B = flags.DEFINE_integer("B", 2, "Batch size.")
_T = flags.DEFINE_integer("T", 8192, "Sequence length.")
_N = flags.DEFINE_integer("N", 16, "Query heads.")
_K = flags.DEFINE_integer("K", None, "Key/value heads (default N).")
_H = flags.DEFINE_integer("H", 128, "Head dim.")
_CAUSAL = flags.DEFINE_bool("causal", True, "Causal mask (else none).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Input dtype.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs per candidate.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per candidate.")
_OUT = flags.DEFINE_string("out", None, "CSV file for the results (also printed).")

# (kernel, implementation name, modes, candidates). flex_triton: block_q, block_kv, warps, stages
# (block_q = block_kv = 64 with 4 warps is the default; FlashAttention-2's Triton tutorial settles
# on 128 x 64 with 8 warps for H = 128). flex_mosaic_gpu: block_q = 64 per compute warpgroup.
CANDIDATES = (
    ("flex_triton", "pallas_triton", ("fwd", "fwd+bwd"), [
        dict(block_q=bq, block_kv=bk, num_warps=w, num_stages=s)
        for bq, bk, w, s in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2),
                             (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3))]),
    ("flex_mosaic_gpu", "pallas_mosaic_gpu", ("fwd",), [
        dict(block_q=bq, block_kv=bk, stages=s)
        for bq, bk, s in ((128, 128, 2), (128, 64, 2), (128, 64, 3), (128, 128, 3), (64, 128, 2))]),
)


def _step(implementation: str, mode: str, q, k, v, do):
  mask_mod = masks.causal() if _CAUSAL.value else None

  def fwd(q, k, v):
    return flex.flex_attention(q, k, v, mask_mod=mask_mod, implementation=implementation)

  if mode == "fwd":
    return jax.jit(fwd).lower(q, k, v).compile(), (q, k, v)
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fwd, q, k, v)
    return out, vjp(do)
  return jax.jit(fwd_bwd).lower(q, k, v, do).compile(), (q, k, v, do)


def main(argv):
  del argv
  if jax.default_backend() != "gpu":
    sys.exit(f"gpu_tiles: needs a CUDA GPU (default backend: {jax.default_backend()})")
  B, T, N, H = _B.value, _T.value, _N.value, _H.value
  K = _K.value or N
  dtype = jnp.dtype(_DTYPE.value)
  rng = np.random.default_rng(0)
  q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, n, H), np.float32), dtype)
                 for n in (N, K, K, N))
  fwd_flops = 4 * B * N * T * T * H * (0.5 if _CAUSAL.value else 1.0)
  kind = platform.device_kind()
  rows = []
  for kernel, implementation, modes, candidates in CANDIDATES:
    key = (kernel, kind, H, dtype.name)
    saved = platform.BLOCK_SIZES.get(key)
    for tiles in candidates:
      platform.BLOCK_SIZES[key] = tiles
      for mode in modes:
        row = dict(kernel=kernel, mode=mode, B=B, T=T, N=N, K=K, H=H, dtype=dtype.name,
                   causal=_CAUSAL.value, tiles=" ".join(f"{a}={b}" for a, b in tiles.items()))
        try:
          start = time.perf_counter()
          compiled, args = _step(implementation, mode, q, k, v, do)
          row["compile_s"] = round(time.perf_counter() - start, 1)
          times = harness.time_runs(lambda: jax.block_until_ready(compiled(*args)),
                                    warmup=_WARMUP.value, repeats=_REPEATS.value)
          ms = statistics.median(times)
          flops = fwd_flops * (3.5 if mode == "fwd+bwd" else 1.0)
          row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), status="ok")
        except Exception as e:  # pylint: disable=broad-except  (one bad tile must not stop the sweep)
          first = str(e).splitlines()[0][:200] if str(e) else ""
          row.update(status=f"failed: {type(e).__name__}: {first}")
        print(row, flush=True)
        rows.append(row)
    if saved is None:
      platform.BLOCK_SIZES.pop(key)
    else:
      platform.BLOCK_SIZES[key] = saved
  fields = ["kernel", "mode", "tiles", "ms", "tflops", "compile_s", "status", "B", "T", "N", "K", "H",
            "dtype", "causal"]
  if _OUT.value:
    with open(_OUT.value, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      writer.writerows(rows)
  for mode in ("fwd", "fwd+bwd"):
    for kernel, *_ in CANDIDATES:
      ok = [r for r in rows if r["kernel"] == kernel and r["mode"] == mode and r["status"] == "ok"]
      if ok:
        best = min(ok, key=lambda r: r["ms"])
        print(f"best {kernel} {mode}: {best['tiles']} {best['ms']} ms {best['tflops']} TFLOP/s")


if __name__ == "__main__":
  app.run(main)
