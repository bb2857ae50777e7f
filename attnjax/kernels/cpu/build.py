"""Builds the CPU flash-attention kernel library (`python -m attnjax.kernels.cpu.build [--force]`).

Compiles `flash_attention.cc` with the machine's C++ compiler (`$CXX`, else g++, c++ or clang++) for
this CPU (`-march=native`) against the XLA FFI headers jaxlib ships (`jax.ffi.include_dir()`), into
`libattnjax_flash.so` beside the source, with a small JSON record of what it was built from (source
hash, CPU, jaxlib) that the loader checks. Takes a few seconds. Without a compiler, or when the compile
fails, it prints a warning and leaves no library: `cpu_flash` then raises NotImplementedError and
`flex_attention` falls back to `xla`. `make test`, `make demo` and `make bench` run it when the library
is missing or older than the source.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "flash_attention.cc"
LIBRARY = HERE / "libattnjax_flash.so"
INFO = HERE / "libattnjax_flash.json"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
TIMEOUT_S = 300


def _cpu_signature() -> str:
  """What a `-march=native` build depends on: the CPU model and feature flags (hashed)."""
  text = platform.machine()
  with contextlib.suppress(OSError):
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    text += "\n".join(sorted(set(keep)))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def expected_info() -> dict:
  """The build record a library usable on this machine with this source and jaxlib must carry."""
  import jaxlib
  return {"source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
          "cpu": _cpu_signature(), "jaxlib": jaxlib.__version__}


def stale_reason() -> Optional[str]:
  """Why the built library cannot be used (None: it is current)."""
  if not LIBRARY.exists() or not INFO.exists():
    return f"{LIBRARY.name} is not built"
  try:
    info = json.loads(INFO.read_text())
  except (OSError, ValueError):
    return f"{INFO.name} is unreadable"
  want = expected_info()
  for key, what in (("source_sha256", "an older source"), ("cpu", "another CPU"),
                    ("jaxlib", "another jaxlib")):
    if info.get(key) != want[key]:
      return f"{LIBRARY.name} was built from {what}"
  return None


def _compiler() -> Optional[str]:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


@contextlib.contextmanager
def _lock():
  """One build at a time across processes (pytest-xdist workers may ask together)."""
  import fcntl
  with open(HERE / ".build.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build(force: bool = False, quiet: bool = False) -> Optional[pathlib.Path]:
  """Compiles the library unless it is current; returns its path, or None (with a warning on stderr)
  when it cannot be built."""
  def warn(msg):
    print(f"attnjax.kernels.cpu.build: WARNING: {msg}; cpu_flash is unavailable and flex_attention "
          "uses its xla implementation", file=sys.stderr)

  if not force and stale_reason() is None:
    return LIBRARY
  cxx = _compiler()
  if cxx is None:
    warn("no C++ compiler found (set $CXX or install g++)")
    return None
  import jax
  with _lock():
    if not force and stale_reason() is None:     # another process built it meanwhile
      return LIBRARY
    info = expected_info()
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
      out = pathlib.Path(tmp) / LIBRARY.name
      cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]
      if not quiet:
        print(" ".join(cmd), file=sys.stderr)
      try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
      except (OSError, subprocess.TimeoutExpired) as e:
        warn(f"compiling failed ({e})")
        return None
      if result.returncode != 0:
        warn(f"compiling failed:\n{result.stderr[-4000:]}")
        return None
      os.replace(out, LIBRARY)                      # atomic: a reader never sees half a library
    INFO.write_text(json.dumps(info, indent=1) + "\n")
  return LIBRARY


def main(argv=None) -> int:
  """Command line: build (or `--force` rebuild); exit status 0 even when no compiler is found."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--force", action="store_true", help="rebuild even when current")
  args = parser.parse_args(argv)
  path = build(force=args.force)
  if path is not None:
    os.utime(path)      # current: newer than its sources for make, even when nothing was compiled
    print(f"attnjax.kernels.cpu.build: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
