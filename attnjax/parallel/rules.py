"""Logical-axis sharding rules: the default map from the models' logical axis names to the mesh.

Parameters and activations of attnjax.models carry logical axis names ("batch", "embed", "heads",
...); these (logical axis, mesh axes) pairs place them on the mesh axes ("data", "fsdp", "tensor")
of `attnjax.parallel.mesh`. A config overrides them with `logical_axis_rules`.
"""

# (logical axis, mesh axes) pairs, first match wins; a mesh axis is used at most once per array,
# so activations ("batch", "length", "embed") shard the batch over data × fsdp and the sequence over
# context (context parallelism: the attention layers run ring attention there), and parameters
# ("embed", ...) over fsdp. Names not listed are replicated.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    # Positional-embedding tables (rows: positions) stay whole on every device: parameters are not
    # split over context, only the activations are.
    ("position", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("patch", None),
    ("norm", None),
)

__all__ = ["DEFAULT_LOGICAL_AXIS_RULES"]
