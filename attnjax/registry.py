"""The registry: the single list of attention mechanisms.

Every mechanism is a function with the common call contract

    fn(q, k, v, *, causal=False, segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
       implementation=None, **params) -> [B, T, N, h]

  q `[B,T,N,H]`, k `[B,S,K,H]`, v `[B,S,K,h]`; `causal` masks keys after the query's absolute position
  `q_offset + q_idx` (`q_offset`: int or `[B]`, the number of earlier tokens, e.g. in a KV cache);
  `segment_ids` (`[B,T]`, or a pair `([B,T], [B,S])` for cross-attention) restrict attention to equal
  ids (packed sequences); `kv_lengths` `[B]` hides keys at or past the length (padding, cache fill).

and a `Mechanism` record saying what it is and what it supports. `attention(name, q, k, v, **kw)` calls
a mechanism by name after checking that the pattern (causal or not, self or cross) is supported; the Flax
layer `attnjax.nn.MultiHeadAttention` does the same, so a registered mechanism is usable in a model at
once, and `tests/conformance` tests it the moment it is registered.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Optional

import jax

PATTERNS = ("self", "causal_self", "cross", "causal_cross")
INPUTS = ("q", "k", "v")
# The Flax collection that holds a mechanism's fixed (non-trainable) arrays, e.g. FAVOR+'s random
# features: the layer creates them there, out of the optimizer's reach (`ParamSpec.trainable`).
BUFFERS = "buffers"
# The Flax rng stream a layer draws from for mechanisms that sample (`Mechanism.rng`); without it
# (e.g. at evaluation) such a mechanism runs its deterministic form.
SAMPLE_RNG = "sample"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """An extra learned array a mechanism takes as a keyword argument; the Flax layer creates it.

  `shape(num_heads, num_kv_heads, head_dim)` gives its shape; `init` is a `jax.nn.initializers`
  initializer. `trainable=False` marks an array the paper keeps fixed (random features, fixed
  filters): the layer creates it in the `BUFFERS` collection instead of 'params', so no optimizer
  moves it (it may still be redrawn, see `attnjax.nn.redraw_buffers`). `settings` names mechanism
  keywords the shape depends on (a kernel size, a grid's rank): `shape` then takes them as keywords,
  given from the mechanism's settings when set there (`shape_for`).
  """
  name: str
  shape: Callable[..., tuple[int, ...]]
  init: Callable[..., Any]
  trainable: bool = True
  settings: tuple[str, ...] = ()

  def shape_for(self, N: int, K: int, H: int, settings: Optional[dict] = None) -> tuple[int, ...]:
    """The shape for N query heads, K key/value heads, head dim H and the mechanism's keyword
    `settings` (defaults and the caller's; only the names in `self.settings` are read, and a name
    the settings lack keeps the shape function's default)."""
    settings = settings or {}
    chosen = {name: settings[name] for name in self.settings
              if name in settings and settings[name] is not None}
    return tuple(self.shape(N, K, H, **chosen))


def example_params(specs, *, N: int = 4, K: int = 2, H: int = 8, seed: int = 0,
                   perturb: float = 0.0, settings: Optional[dict] = None) -> dict:
  """Concrete float32 numpy arrays for the `ParamSpec`s `specs` at the given sizes (by default
  those of the conformance suite) and mechanism `settings`: each spec's init plus `perturb`·N(0, 1),
  so that zero-initialized gates and offsets are exercised too. For `Mechanism.example` functions."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(specs))
  out = {}
  for key, spec in zip(keys, specs, strict=True):
    shape = spec.shape_for(N, K, H, settings)
    value = np.asarray(spec.init(key, shape, np.float32))
    out[spec.name] = (value + perturb * rng.standard_normal(shape)).astype(np.float32)
  return out


def example_arrays(seed: int, shapes: dict[str, tuple[tuple[int, ...], float, float]]
                   ) -> dict[str, Any]:
  """`{name: mean + std · normal(shape)}` float32 numpy arrays (no device work at import), drawn in
  the order of `shapes` from one generator seeded with `seed`. For `Mechanism.example` functions of
  arrays that have no `ParamSpec` init to start from."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  return {name: (mean + std * rng.standard_normal(shape)).astype(np.float32)
          for name, (shape, mean, std) in shapes.items()}


TOKEN_SIDES = ("q", "kv")
TOKEN_KINDS = ("projected", "given")
TOKEN_DTYPES = ("float", "bool", "int")


@dataclasses.dataclass(frozen=True)
class TokenInput:
  """A per-token array a mechanism takes as a keyword besides q, k, v.

  Its shape is `[B, L, *shape(N, K, H)]`: L = T for `side="q"` (one entry per query token, read at
  the query's row) or L = S for `side="kv"` (one per key/value token; a query at absolute position
  `q_offset + t` of a self-attention reads entries up to its own, as FoX's cumulative forget gates do).

  `kind="projected"`: the paper computes it from the layer input x: the Flax layer creates a
  projection `x W + b` (bias initialized by `bias_init`) to `shape` and applies `activation`, from the
  query input for side "q" and from the key/value input for side "kv" (e.g. FoX's log forget gates
  `log σ(x W_f + b_f)`, a per-token head gate). `kind="given"`: data the caller passes per call
  (token types, a region mask, pitches), which the layer requires in `apply(..., name=array)`.
  `dtype` ("float", "bool", "int" with values in `[0, num_values)`) says what the mechanism accepts.
  When decoding over a KV cache, the layer caches side-"kv" entries beside the keys.
  """
  name: str
  side: str
  shape: Callable[[int, int, int], tuple[int, ...]] = lambda N, K, H: ()
  kind: str = "projected"
  dtype: str = "float"
  num_values: int = 0
  activation: Optional[Callable[[Any], Any]] = None
  bias_init: Callable[..., Any] = jax.nn.initializers.zeros

  def __post_init__(self):
    if self.side not in TOKEN_SIDES:
      raise ValueError(f"TokenInput {self.name!r}: side must be one of {TOKEN_SIDES}, got {self.side!r}")
    if self.kind not in TOKEN_KINDS:
      raise ValueError(f"TokenInput {self.name!r}: kind must be one of {TOKEN_KINDS}, got {self.kind!r}")
    if self.dtype not in TOKEN_DTYPES:
      raise ValueError(f"TokenInput {self.name!r}: dtype must be one of {TOKEN_DTYPES}, "
                       f"got {self.dtype!r}")
    if self.kind == "projected" and self.dtype != "float":
      raise ValueError(f"TokenInput {self.name!r}: a projected input is a float array")
    if self.dtype == "int" and self.num_values < 1:
      raise ValueError(f"TokenInput {self.name!r}: an int input needs num_values >= 1")


# eq=False: records compare and hash by identity (their dict fields are unhashable), so a record can
# be a static argument under jit.
@dataclasses.dataclass(frozen=True, eq=False)
class Mechanism:
  """One attention mechanism from the literature.

  Attributes:
    name: snake_case registry name (the catalog's operator name unless a better one exists).
    fn: the operator, with the common call contract of this module.
    family: catalog family ("softmax-core", "local-window", "linear", ...).
    seeds: catalog row numbers (`shared/seeds/catalog.tsv`, column n) this mechanism implements.
    paper: title of the paper, and arxiv: its arXiv id.
    patterns: supported subset of PATTERNS (CAB taxonomy: noncausal/causal × self/cross).
    gqa: accepts fewer key/value heads than query heads.
    decode: `q_offset` + `kv_lengths` over a KV cache give the same result as the full forward.
    recurrent: decoding can carry a fixed-size state instead of a KV cache: on the new tokens of a
      causal self-attention, `fn(q, k, v, causal=True, q_offset=n, initial_state=state,
      return_final_state=True)` (n earlier tokens; `state` None before the first token) returns
      `(out, new_state)`, equal to the full forward's rows. `state_size` counts that state.
    recurrent_when: with `recurrent`, the keyword settings under which the state is bounded
      (`(kwargs) -> bool`, defaults applied; e.g. Mega's chunked form only); None: always. Read
      through `recurrent_for(kwargs)`; the layer keeps a KV cache when it is False.
    packed: honours `segment_ids`.
    reads: which of the inputs q, k, v the operator reads (a subset of INPUTS). A mechanism whose
      paper derives queries (or keys) from a shared stream declares the inputs it does not read; it
      still takes them (for their shapes), and the Flax layer creates no projection for them.
    rng: the keyword that takes a PRNG key when the mechanism samples (None: it never does). The
      layer passes a key from its `SAMPLE_RNG` stream when the caller provides one.
    complexity: time complexity in T (queries) and S (keys).
    implementations: the `implementation=` names it accepts, fastest first.
    params: learned arrays the layer must create and pass (ParamSpec).
    token_inputs: per-token arrays besides q, k, v (`TokenInput`): computed by the layer from its
      input (forget gates, per-token head gates) or passed by the caller (token types, masks).
    defaults: keyword arguments used when the caller gives none.
    example: keyword arguments that exercise the mechanism at test sizes (T, S ~ 16-64), used by the
      conformance suite (e.g. a window smaller than the sequence): a dict of Python / numpy values,
      or a function returning one when the values need JAX to build (importing attnjax must not run
      JAX computations); a function that takes keywords N, K, H, h builds arrays at the sizes it is
      asked for. Read it through `example_kwargs_for(N=, K=, H=, h=)`.
    state_size: `(T, N, K, H, h, kwargs) -> int`, the numbers per sequence the mechanism must keep
      to produce the next token after T tokens (its recurrent state, or the part of the cache it
      reads), given its keyword arguments (defaults applied); None means the whole KV cache,
      `T·K·(H+h)`. Leaderboards plot accuracy against it.
    flex_mods: for a mechanism that is softmax attention under a score / mask mod (the flex
      variants), `(causal, num_heads, **kwargs) -> dict` of `flex_attention` keywords (`score_mod`,
      `mask_mod` in global positions, and `causal` where the mechanism sets it itself) that compute
      it, given its keyword arguments (only those named in the function's signature; its defaults
      fill the rest; it returns None for settings that have no such form, e.g. mods that index
      the batch). Forms that run the flex core themselves use it (`attnjax.parallel.context`
      shards such a mechanism along T); None: the mechanism has no such form.
  """
  name: str
  fn: Callable[..., Any]
  family: str
  seeds: tuple[int, ...]
  paper: str
  arxiv: str
  patterns: frozenset[str] = frozenset(PATTERNS)
  gqa: bool = True
  decode: bool = True
  recurrent: bool = False
  packed: bool = True
  reads: frozenset[str] = frozenset(INPUTS)
  rng: Optional[str] = None
  complexity: str = "O(T·S)"
  implementations: tuple[str, ...] = ("xla", "reference")
  params: tuple[ParamSpec, ...] = ()
  token_inputs: tuple[TokenInput, ...] = ()
  defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
  example: Any = dataclasses.field(default_factory=dict)
  state_size: Optional[Callable[..., int]] = None
  recurrent_when: Optional[Callable[[dict[str, Any]], bool]] = None
  flex_mods: Optional[Callable[..., dict[str, Any]]] = None

  def recurrent_for(self, kwargs: Optional[dict[str, Any]] = None) -> bool:
    """Whether the mechanism decodes with its fixed-size state under the keyword arguments `kwargs`
    (the defaults fill the rest): `recurrent`, and `recurrent_when` holds."""
    if not self.recurrent:
      return False
    return self.recurrent_when is None or bool(
        self.recurrent_when({**self.defaults, **(kwargs or {})}))

  def decode_state_floats(self, T: int, N: int, K: int, H: int, h: int,
                          kwargs: Optional[dict[str, Any]] = None) -> int:
    """Numbers kept per sequence to decode after T tokens (see `state_size`), for the keyword
    arguments `kwargs` (the mechanism's defaults fill the rest)."""
    if self.state_size is None:
      return T * K * (H + h)
    return int(self.state_size(T, N, K, H, h, {**self.defaults, **(kwargs or {})}))

  def example_kwargs_for(self, *, N: int = 4, K: int = 2, H: int = 8, h: int = 6) -> dict[str, Any]:
    """`example` at the given sizes, built eagerly (even under a jit trace) if it is a function. A
    function that takes keywords N, K, H, h gets them, so a suite can pick its shapes without
    touching library files; one that takes none returns size-free settings."""
    if not callable(self.example):
      return dict(self.example)
    wanted = inspect.signature(self.example).parameters
    sizes = {name: value for name, value in dict(N=N, K=K, H=H, h=h).items() if name in wanted}
    with jax.ensure_compile_time_eval():
      return dict(self.example(**sizes))

  @property
  def flex_mods_keywords(self) -> frozenset[str]:
    """The mechanism keywords its `flex_mods` reads (empty when it declares none)."""
    if self.flex_mods is None:
      return frozenset()
    return frozenset(inspect.signature(self.flex_mods).parameters) - {"causal", "num_heads"}

  def flex_mods_for(self, causal: bool, num_heads: int,
                    kwargs: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """`flex_mods` for the pattern and the keyword arguments `kwargs`, passing only those it names
    (`flex_mods_keywords`; its defaults fill the rest). None when the mechanism has no such form,
    or none at these settings."""
    if self.flex_mods is None:
      return None
    own = self.flex_mods_keywords
    return self.flex_mods(causal, num_heads, **{key: x for key, x in (kwargs or {}).items()
                                                 if key in own})

  @property
  def example_kwargs(self) -> dict[str, Any]:
    """`example_kwargs_for` at the default sizes (N, K, H, h) = (4, 2, 8, 6)."""
    return self.example_kwargs_for()

  @property
  def summary(self) -> str:
    """First line of the operator's docstring."""
    return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""

  def check_pattern(self, *, causal: bool, cross: bool):
    """Raises a clear error when the mechanism does not support the requested pattern."""
    pattern = ("causal_" if causal else "") + ("cross" if cross else "self")
    if pattern not in self.patterns:
      raise ValueError(f"mechanism {self.name!r} does not support {pattern.replace('_', ' ')} "
                       f"attention; it supports {sorted(self.patterns)}")

  def __call__(self, q, k, v, *, causal: bool = False, cross: Optional[bool] = None, **kwargs):
    """Calls `fn` after the pattern check. `cross` defaults to `T != S` (a self-attention with a
    cache is still self: pass cross=False)."""
    if cross is None:
      cross = q.shape[1] != k.shape[1]
    self.check_pattern(causal=causal, cross=cross)
    if any(p.name not in kwargs for p in self.params):
      missing = [p.name for p in self.params if p.name not in kwargs]
      raise ValueError(f"mechanism {self.name!r} needs the learned arrays {missing} as keywords "
                       "(attnjax.nn.MultiHeadAttention creates them)")
    missing = [t.name for t in self.token_inputs if t.name not in kwargs]
    if missing:
      raise ValueError(f"mechanism {self.name!r} needs the per-token arrays {missing} as keywords "
                       "(see its token_inputs)")
    kwargs = {**self.defaults, **kwargs}
    return self.fn(q, k, v, causal=causal, **kwargs)


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
  """Adds a mechanism; names are unique."""
  if mechanism.name in _REGISTRY:
    raise ValueError(f"mechanism {mechanism.name!r} is already registered")
  bad = set(mechanism.patterns) - set(PATTERNS)
  if bad:
    raise ValueError(f"mechanism {mechanism.name!r}: unknown patterns {sorted(bad)}; use {PATTERNS}")
  if mechanism.recurrent and not (mechanism.decode and "causal_self" in mechanism.patterns):
    raise ValueError(f"mechanism {mechanism.name!r}: `recurrent` decoding needs `decode` and the "
                     "causal_self pattern")
  if not mechanism.reads or not set(mechanism.reads) <= set(INPUTS):
    raise ValueError(f"mechanism {mechanism.name!r}: `reads` must be a non-empty subset of {INPUTS}")
  if not mechanism.seeds:
    raise ValueError(f"mechanism {mechanism.name!r} must name the catalog rows it implements (seeds)")
  _REGISTRY[mechanism.name] = mechanism
  return mechanism


def _load():
  # Importing the ops package registers every mechanism (each module calls register at import).
  import attnjax.ops  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


def get(name: str) -> Mechanism:
  """The mechanism registered under `name`."""
  _load()
  return lookup(_REGISTRY, name, "attention mechanism", "attnjax.list_mechanisms()")


def lookup(table: dict, name: str, what: str, lister: str):
  """`table[name]`, or a ValueError naming `what` was unknown, the closest registered names and
  `lister` (the call that lists them): the registries hold well over a hundred names, so the error
  suggests the nearest instead of printing the whole list."""
  try:
    return table[name]
  except (KeyError, TypeError):
    close = difflib.get_close_matches(str(name), [str(n) for n in table], n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(f"unknown {what} {name!r}; {hint}see {lister} for the registered names") from None


def list_mechanisms(family: Optional[str] = None) -> list[Mechanism]:
  """Every registered mechanism (optionally of one family), sorted by name."""
  _load()
  return [m for _, m in sorted(_REGISTRY.items()) if family is None or m.family == family]


def attention(name: str, q, k, v, **kwargs):
  """Calls the mechanism `name` on `q, k, v` with the common contract (see module docstring)."""
  return get(name)(q, k, v, **kwargs)
