"""The seed catalog: the papers attnjax implements, and what in the library serves each one.

The package keeps its own table of the seed papers (`seeds.tsv`: number, title, arXiv id, kind,
family, the catalog's proposed operator name, and for some rows `uses` / `note`). Whatever serves a
row declares it where it is defined, so no list of coverage is kept by hand:

  - a registered mechanism or module through its record's `seeds` (`attnjax.registry.Mechanism`,
    `attnjax.modules.Module`);
  - anything else (a Flax layer, an analysis tool, a training loss, a model option, a pooling
    function) with the `serves(*rows)` decorator, or `register_server(name, rows, kind)` for what is
    not a Python object (a config option).

`coverage()` maps every row to the names that serve it; `status(n)` says whether a row is served,
is an application of general mechanisms (its `uses` column names them), or is not served and why
(its `note`, else the family's plan). `python -m attnjax.docs` writes `docs/CATALOG.md` from these.

    import attnjax as aj
    aj.catalog.coverage()[77]        # ['forgetting_attention']
    aj.catalog.status(43)            # ('not served', '...')
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import pathlib
from typing import Callable, Optional, Sequence, TypeVar

__all__ = ["Row", "Server", "coverage", "register_server", "rows", "servers", "serves", "status",
           "IMPLEMENTABLE_KINDS"]

SEEDS_TSV = pathlib.Path(__file__).resolve().parent / "seeds.tsv"
# Rows of these kinds propose something to build; "application" rows apply general mechanisms.
IMPLEMENTABLE_KINDS = ("operator", "module", "kernel", "analysis", "training", "theory")
# The packages whose import registers everything that serves a row.
_SERVING_PACKAGES = ("attnjax.ops", "attnjax.nn", "attnjax.models", "attnjax.vision", "attnjax.graph",
                      "attnjax.cross", "attnjax.geometry", "attnjax.analysis", "attnjax.train")
# What the project plans for a family's rows not served yet.
_FAMILY_PLANS = {
    "local-window": "planned with local, neighborhood and block-sparse attention",
    "sparse-trainable": "planned with local, neighborhood and block-sparse attention",
    "sparse-inference": "planned with local, neighborhood and block-sparse attention",
    "kernel": "planned with the GPU kernels",
    "decode-kvcache": "planned with the paged KV cache and decode-time mechanisms",
    "quantized": "planned with the paged KV cache and decode-time mechanisms",
    "channel-spatial": "planned with the vision attention modules",
    "interpretability": "planned with the analysis and interpretability tools",
    "training": "planned with the attention-based training losses",
    "theory": "planned with the theory papers' probes",
    "graph": "planned with graph, cross-attention and geometric modules",
    "cross-attention": "planned with graph, cross-attention and geometric modules",
    "geometric": "planned with graph, cross-attention and geometric modules",
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One seed paper (`seeds.tsv`)."""
  n: int
  title: str
  arxiv: str
  kind: str
  family: str
  operator_name: str
  uses: tuple[str, ...]
  note: str


@dataclasses.dataclass(frozen=True)
class Server:
  """Something other than a registered mechanism that serves catalog rows."""
  name: str
  seeds: tuple[int, ...]
  kind: str


_ROWS: Optional[dict[int, Row]] = None
_SERVERS: dict[str, Server] = {}


def rows() -> dict[int, Row]:
  """Every seed paper by its number."""
  global _ROWS
  if _ROWS is None:
    with SEEDS_TSV.open(newline="") as f:
      _ROWS = {int(r["n"]): Row(int(r["n"]), r["title"], r["arxiv"], r["kind"], r["family"],
                                r["operator_name"], tuple(u for u in r["uses"].split() if u),
                                r["note"])
               for r in csv.DictReader(f, delimiter="\t")}
  return _ROWS


def register_server(name: str, seeds: Sequence[int], kind: str) -> Server:
  """Declares that `name` (a layer, function, loss, tool or model option) serves catalog `seeds`."""
  seeds = tuple(int(s) for s in seeds)
  unknown = [s for s in seeds if s not in rows()]
  if not seeds or unknown:
    raise ValueError(f"catalog.register_server({name!r}): seeds must be catalog rows, got {seeds}")
  if name in _SERVERS and _SERVERS[name].seeds != seeds:
    raise ValueError(f"catalog.register_server: {name!r} is already registered")
  _SERVERS[name] = Server(name, seeds, kind)
  return _SERVERS[name]


T = TypeVar("T")


def serves(*seeds: int, kind: str = "layer", name: Optional[str] = None) -> Callable[[T], T]:
  """Decorator: the class or function serves the catalog rows `seeds`. Its name in the catalog is
  `name`, or its public path (`attnjax.nn.GatedAttentionUnit`: the package and the qualified name)."""

  def mark(obj: T) -> T:
    package = ".".join(obj.__module__.split(".")[:2])
    register_server(name or f"{package}.{obj.__qualname__}", seeds, kind)
    return obj

  return mark


def _load():
  for package in _SERVING_PACKAGES:
    importlib.import_module(package)


def coverage() -> dict[int, list[str]]:
  """`{row: [names of what serves it]}` for every row (an empty list: nothing serves it yet):
  registered mechanisms and modules by their seeds, and everything declared with
  `serves`/`register_server`."""
  from attnjax import modules, registry  # pylint: disable=import-outside-toplevel
  _load()
  out: dict[int, list[str]] = {n: [] for n in rows()}
  for m in [*registry.list_mechanisms(), *modules.list_modules()]:
    for s in m.seeds:
      out[s].append(m.name)
  for server in sorted(_SERVERS.values(), key=lambda x: x.name):
    for s in server.seeds:
      out[s].append(server.name)
  return out


def servers() -> list[Server]:
  """The non-mechanism servers declared so far (after loading the serving packages)."""
  _load()
  return sorted(_SERVERS.values(), key=lambda x: x.name)


def status(n: int) -> tuple[str, str]:
  """`("served", names)`, `("application", how)` or `("not served", why)` for row `n`."""
  row = rows()[n]
  names = coverage()[n]
  if names:
    return "served", ", ".join(names)
  if row.kind == "application":
    if not row.uses:
      return "application", row.note or "applies general attention; no general mechanism named yet"
    from attnjax import modules, registry  # pylint: disable=import-outside-toplevel
    known = ({m.name for m in registry.list_mechanisms()} | {m.name for m in modules.list_modules()}
             | {s.name for s in _SERVERS.values()})
    have = [u for u in row.uses if u in known]
    missing = [u for u in row.uses if u not in known]
    text = "uses " + ", ".join(have) if have else ""
    if missing:
      text += ("; " if text else "") + "needs " + ", ".join(missing) + " (not registered yet)"
    return "application", text + (f" ({row.note})" if row.note else "")
  return "not served", row.note or _FAMILY_PLANS.get(row.family, "not implemented yet")
