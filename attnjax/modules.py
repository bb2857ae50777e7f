"""The module registry: attention modules that act on data other than a token sequence's q, k, v.

Sequence mechanisms keep the `q, k, v` contract of `attnjax.registry`. A module here acts on another
kind of input (`KINDS`): feature maps `[B, H, W, C]` (channel, spatial and convolutional attention),
1-D signals `[B, L, C]` (audio, temporal features), pair grids `[B, T, S, C]` of two sequences,
graphs (node features `[V, F]` with `senders`, `receivers` `[E]` edge lists: `attnjax.graph`) and
point sets `[B, N, C]` (`attnjax.geometry`). Each
record holds

  - `fn`, the pure function: `fn(x, *extra_inputs, **weights, **settings) -> y`, every weight an
    explicit keyword array (what the paper computes, with the formula in its docstring);
  - `linen`, the Flax Linen class that only creates those weights (its parameter names are `fn`'s
    keywords, so `fn(x, **variables["params"], **settings)` equals `linen(**settings).apply(...)`)
    and calls `fn`; its defaults work on the kind's input with no arguments,
    `aj.get_module(name).linen()`;
  - what the conformance suite (`tests/conformance/modules_test.py`) needs: `example` settings at
    test sizes, `extra_inputs` (e.g. PKCAM's previous-layer features), and `gate_range`, the bound
    the paper puts on the module's gates (sigmoid gates in (0, 1)), checked on the arrays the Linen
    class sows as `("intermediates", "gate")`.

    import attnjax as aj
    record = aj.get_module("eca_channel_attention")
    layer = record.linen()                       # a Flax module on [B, H, W, C]
    aj.list_modules(kind="feature_map")          # every feature-map module, by name
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from attnjax import registry

__all__ = ["EXAMPLE_COMPONENTS", "EXAMPLE_EDGES", "KINDS", "ExtraInput", "Module", "get_module",
           "graph_inputs", "list_modules", "register_module"]

# What a module takes: a feature map [B, H, W, C], a signal [B, L, C], a graph, a point set, or a
# pair grid [B, T, S, C] (features of every (target, source) pair of two sequences).
KINDS = ("feature_map", "signal", "graph", "points", "pair")
# The conformance suite's input shape for each kind it can build.
EXAMPLE_SHAPES = {"feature_map": (2, 9, 11, 16), "signal": (2, 23, 16), "pair": (2, 5, 7, 16),
                  "graph": (12, 16), "points": (2, 24, 16)}
# The name under which a Linen class sows its gates (collection "intermediates").
GATE = "gate"


@dataclasses.dataclass(frozen=True)
class ExtraInput:
  """An input besides `x` that `fn` takes positionally after it (and the Linen class's `__call__`
  too): `shape(x_shape) -> shape` for the conformance suite's random example (float32 normal, or
  log-normal when `positive`: e.g. physical parameters the module takes the log of)."""
  name: str
  shape: Callable[[tuple[int, ...]], tuple[int, ...]]
  positive: bool = False
  # A fixed example instead of a random draw (e.g. a graph's edge list): `fixed(x_shape) -> array`.
  fixed: Optional[Callable[[tuple[int, ...]], Any]] = None


# The graph of the conformance suite: two components of 6 nodes (0-5, 6-11), each a ring in both
# directions plus two chords and a self-loop, so the components play the part of a batch's examples.
_COMPONENT = ([(i, (i + 1) % 6) for i in range(6)] + [((i + 1) % 6, i) for i in range(6)]
              + [(0, 3), (4, 1), (2, 2)])
EXAMPLE_EDGES = tuple(_COMPONENT + [(s + 6, r + 6) for s, r in _COMPONENT])
EXAMPLE_COMPONENTS = (range(0, 6), range(6, 12))


def graph_inputs() -> tuple[ExtraInput, ExtraInput]:
  """The `senders` and `receivers` extra inputs of a graph module (the suite's example graph)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  edges = np.asarray(EXAMPLE_EDGES, np.int32)
  return (ExtraInput("senders", lambda s: (len(EXAMPLE_EDGES),), fixed=lambda s: edges[:, 0]),
          ExtraInput("receivers", lambda s: (len(EXAMPLE_EDGES),), fixed=lambda s: edges[:, 1]))


@dataclasses.dataclass(frozen=True)
class Module:
  """One attention module from the literature (module docstring).

  Attributes:
    name: snake_case registry name (the catalog's proposed name unless a better one exists).
    fn: the pure function `fn(x, *extra, **weights, **settings)`.
    linen: the Flax Linen class creating the weights and calling `fn` (keywords: the settings).
    kind: one of `KINDS`.
    family: catalog family ("channel-spatial", "alternative-mixer", ...).
    seeds: catalog rows it implements; paper, arxiv: the paper's title and arXiv id.
    extra_inputs: inputs after `x` (`ExtraInput`), e.g. a previous layer's features.
    gate_range: `(low, high)`, the open interval the paper's gates lie in (None: no bounded gate).
    keeps_shape: the output has x's shape (else `out_shape(x_shape, settings)` gives it).
    example: settings that exercise the module at the suite's sizes.
    baseline: a reference module the catalog's rows are compared against (squeeze-and-excitation),
      registered without seeds.
  """
  name: str
  fn: Callable[..., Any]
  linen: Callable[..., Any]
  kind: str
  family: str
  seeds: tuple[int, ...]
  paper: str
  arxiv: str
  extra_inputs: tuple[ExtraInput, ...] = ()
  gate_range: Optional[tuple[float, float]] = None
  keeps_shape: bool = True
  out_shape: Optional[Callable[[tuple[int, ...], Mapping[str, Any]], tuple[int, ...]]] = None
  example: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  baseline: bool = False

  @property
  def summary(self) -> str:
    """First line of the function's docstring."""
    return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""

  def output_shape(self, x_shape: tuple[int, ...], settings: Optional[Mapping[str, Any]] = None
                   ) -> tuple[int, ...]:
    if self.keeps_shape:
      return tuple(x_shape)
    return tuple(self.out_shape(tuple(x_shape), dict(settings or {})))


_MODULES: dict[str, Module] = {}


def register_module(module: Module) -> Module:
  """Adds a module record; names are unique (and distinct from the mechanisms')."""
  if module.name in _MODULES:
    raise ValueError(f"module {module.name!r} is already registered")
  if module.kind not in KINDS:
    raise ValueError(f"module {module.name!r}: kind must be one of {KINDS}, got {module.kind!r}")
  if not module.seeds and not module.baseline:
    raise ValueError(f"module {module.name!r} must name the catalog rows it implements (seeds)")
  if not module.keeps_shape and module.out_shape is None:
    raise ValueError(f"module {module.name!r}: keeps_shape=False needs out_shape")
  if module.gate_range is not None and not module.gate_range[0] < module.gate_range[1]:
    raise ValueError(f"module {module.name!r}: gate_range must be (low, high), got "
                     f"{module.gate_range}")
  _MODULES[module.name] = module
  return module


def _load():
  # Importing the packages that define modules registers them.
  import attnjax.cross  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import attnjax.geometry  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import attnjax.graph  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import attnjax.vision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


def get_module(name: str) -> Module:
  """The module registered under `name`."""
  _load()
  return registry.lookup(_MODULES, name, "attention module", "attnjax.list_modules()")


def list_modules(kind: Optional[str] = None) -> list[Module]:
  """Every registered module (optionally of one kind), sorted by name."""
  if kind is not None and kind not in KINDS:
    raise ValueError(f"list_modules: kind must be one of {KINDS} or None, got {kind!r}")
  _load()
  return [m for _, m in sorted(_MODULES.items()) if kind is None or m.kind == kind]
