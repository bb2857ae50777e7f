"""Suite-wide settings: float32 matmuls at full precision so comparisons test the algorithm, a
cheap XLA backend optimization level, and a compilation cache shared by the run's workers.

The suite is dominated by compiling many small programs, not by running them: LLVM's optimization
level 0 halves the wall time on a 2-core CPU (tests/core/linear_test.py: 4 min 29 s -> 2 min 29 s)
and does not change what a program computes (no fast-math; that is a separate flag). Set XLA_FLAGS
yourself to override it.
"""

import atexit
import gc
import os
import shutil
import tempfile

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  # Before the backend starts (the first jax.devices() below), so every compile uses it.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  pylint: disable=wrong-import-position
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Many programs repeat across test files (the same reference attention at the same sizes, the same
# layer in several model tests): a persistent compilation cache shared by the run's xdist workers
# turns each repeat into a read (tests/ops/memory + low_rank cold: 153 s -> 139 s). One fresh
# directory per run, made by the controller (whose environment the workers inherit) and removed at
# its exit, so every run is as cold as CI's and the disk does not fill.
_CACHE_ENV = "ATTNJAX_TEST_COMPILATION_CACHE"
if _CACHE_ENV not in os.environ:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="attnjax-compilation-cache-")
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_collection_modifyitems(config, items):
  del config
  has_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip)
  _group_by_mechanism(items)


def _group_by_mechanism(items):
  """Runs each mechanism's conformance checks one after another (in place of pytest's order, test
  function by test function), so they land on one xdist worker (`worksteal` hands out contiguous
  runs) and share the programs that worker compiled for that mechanism (the suite is compile-bound).
  Other tests keep their places."""
  slots = [i for i, item in enumerate(items)
           if "mech" in getattr(getattr(item, "callspec", None), "params", {})]
  ordered = sorted((items[i] for i in slots), key=lambda item: item.callspec.params["mech"])
  for i, item in zip(slots, ordered, strict=True):
    items[i] = item


# Half the kernel's default per-process limit on memory mappings (`vm.max_map_count`, 65530).
_MAX_MAPPINGS = 32000


def _mapping_count() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return f.read().count(b"\n")
  except OSError:   # not Linux: no such limit to stay under
    return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
  """Drops JAX's compiled programs once this process holds many memory mappings.

  A worker process keeps every executable it compiled, and each holds mappings for its code: the
  conformance module alone took one worker past 50,000, and near the end of the suite XLA aborted or
  segfaulted inside `backend_compile` once the limit was hit. Clearing only past a threshold keeps
  the programs that consecutive checks share (the suite is compile-bound).
  """
  yield
  if _mapping_count() > _MAX_MAPPINGS:
    jax.clear_caches()
    gc.collect()
