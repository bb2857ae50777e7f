r"""Context parallelism on fake CPU devices: compiled memory per device and causal load balance.

  python -m experiments.context_parallel --length=65536 --devices=1,2,4,8 [--grad]

For each device count P (a `context` axis of P host devices, forced with XLA_FLAGS before JAX
starts), compiles `attnjax.parallel.context_parallel_attention` (causal, ring, bf16, B = 1, one
head of 64), or with --grad the gradient of a loss of its output (training), and prints its
per-device memory analysis: arguments, output and temporaries. Then the
per-device counts of unmasked causal (query block, key block) tiles in the zigzag and contiguous
layouts (`tile_counts`). Prints markdown tables; docs/benchmarks.md records a run.
"""

import os
import sys

from absl import app
from absl import flags

_LENGTH = flags.DEFINE_integer("length", 65536, "Sequence length T.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Context-axis sizes P.")
_LAYOUT = flags.DEFINE_enum("layout", "zigzag", ["zigzag", "contiguous"], "Token layout.")
_BLOCK = flags.DEFINE_integer("block", 512, "Tile size of the load-balance count.")
_GRAD = flags.DEFINE_bool("grad", False, "Compile the gradient of a loss of the output (training) "
                          "instead of the forward.")


def main(argv):
  del argv
  wanted = max(int(p) for p in _DEVICES.value)
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={wanted}")
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from attnjax.parallel import context as cp  # pylint: disable=import-outside-toplevel
  from attnjax.parallel.mesh import MESH_AXES  # pylint: disable=import-outside-toplevel

  T, out = _LENGTH.value, sys.stdout
  out.write("| P | T | arguments (MB) | output (MB) | temporaries (MB) |\n"
            "| ---: | ---: | ---: | ---: | ---: |\n")
  for p in (int(x) for x in _DEVICES.value):
    devices = np.array(jax.devices()[:p]).reshape(1, 1, 1, p)
    mesh = jax.sharding.Mesh(devices, MESH_AXES)
    shape = jax.ShapeDtypeStruct((1, T, 1, 64), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, "context")))
    def attend(q, k, v, mesh=mesh):
      return cp.context_parallel_attention(q, k, v, mesh=mesh, causal=True, layout=_LAYOUT.value)

    if _GRAD.value:
      fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                            argnums=(0, 1, 2)))
    else:
      fn = jax.jit(attend)
    memory = fn.lower(shape, shape, shape).compile().memory_analysis()
    out.write(f"| {p} | {T} | {memory.argument_size_in_bytes / 1e6:.1f} | "
              f"{memory.output_size_in_bytes / 1e6:.1f} | {memory.temp_size_in_bytes / 1e6:.1f} |\n")
  out.write("\n| P | layout | unmasked causal tiles per device | max / min |\n"
            "| ---: | --- | --- | ---: |\n")
  for p in (int(x) for x in _DEVICES.value):
    for layout in ("zigzag", "contiguous"):
      counts = cp.tile_counts(T, p, layout=layout, block=_BLOCK.value)
      out.write(f"| {p} | {layout} | {' '.join(map(str, counts))} | "
                f"{counts.max() / counts.min():.2f} |\n")


if __name__ == "__main__":
  app.run(main)
