"""Generates `docs/MECHANISMS.md`, `docs/CATALOG.md` and the README's mechanism table from the
registry and the catalog.

    python -m attnjax.docs          # rewrite them
    python -m attnjax.docs --check  # exit 1 if any is stale (the test suite checks this too)
"""

from __future__ import annotations

import pathlib
import sys

from attnjax import catalog
from attnjax import modules
from attnjax import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
MECHANISMS_MD = ROOT / "docs" / "MECHANISMS.md"
CATALOG_MD = ROOT / "docs" / "CATALOG.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- mechanisms:begin -->", "<!-- mechanisms:end -->"

_PATTERN_MARKS = (("self", "S"), ("causal_self", "CS"), ("cross", "X"), ("causal_cross", "CX"))


def _patterns(m: registry.Mechanism) -> str:
  return " ".join(mark for pattern, mark in _PATTERN_MARKS if pattern in m.patterns)


# The size at which the table states each mechanism's decoding state.
STATE_AT = dict(T=4096, N=8, K=8, H=64, h=64)


def _state(m: registry.Mechanism) -> str:
  """Numbers kept per sequence at STATE_AT, and whether they grow with T ("n/a": no decoding)."""
  if not m.decode or not {"causal_self", "causal_cross"} & set(m.patterns):
    return "n/a"
  size = m.decode_state_floats(**STATE_AT)
  grows = m.decode_state_floats(**{**STATE_AT, "T": 2 * STATE_AT["T"]}) > size
  return f"{size / 1e6:.3g}M{' (grows with T)' if grows else ''}"


def _decode(m: registry.Mechanism) -> str:
  """How the Flax layer decodes: carried state, KV cache, or not at all."""
  if not m.decode:
    return "no"
  return "state" if m.recurrent_for() else "KV cache"


def mechanism_table() -> str:
  """One markdown row per registered mechanism."""
  rows = ["| name | family | catalog # | paper | patterns | reads | GQA | decode | packed | "
          "complexity | decode state | implementations |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  yes = lambda flag: "yes" if flag else "no"
  for m in registry.list_mechanisms():
    seeds = " ".join(f"#{s}" for s in m.seeds)
    reads = " ".join(x for x in registry.INPUTS if x in m.reads)
    rows.append(f"| `{m.name}` | {m.family} | {seeds} | {m.paper} (arXiv:{m.arxiv}) | {_patterns(m)} "
                f"| {reads} | {yes(m.gqa)} | {_decode(m)} | {yes(m.packed)} | {m.complexity} | "
                f"{_state(m)} | {', '.join(m.implementations)} |")
  return "\n".join(rows) + "\n"


def module_table() -> str:
  """One markdown row per registered module (`attnjax.modules`)."""
  rows = ["| name | kind | family | catalog # | paper | gate range | extra inputs |",
          "|---|---|---|---|---|---|---|"]
  for m in modules.list_modules():
    seeds = " ".join(f"#{s}" for s in m.seeds) or "baseline"
    gate = "—" if m.gate_range is None else f"[{m.gate_range[0]:g}, {m.gate_range[1]:g}]"
    extra = ", ".join(e.name for e in m.extra_inputs) or "—"
    rows.append(f"| `{m.name}` | {m.kind} | {m.family} | {seeds} | {m.paper} (arXiv:{m.arxiv}) | "
                f"{gate} | {extra} |")
  return "\n".join(rows) + "\n"


def mechanisms_md() -> str:
  """The whole of docs/MECHANISMS.md."""
  lines = ["# Registered mechanisms", "",
           "Generated from the registry by `python -m attnjax.docs`; do not edit by hand.", "",
           "Patterns (CAB taxonomy): S noncausal self, CS causal self, X noncausal cross, CX causal "
           "cross. Catalog numbers refer to `shared/seeds/catalog.tsv`. Decode state: numbers kept "
           "per sequence to produce the next token after T=4096 tokens with N=K=8 heads, H=h=64 "
           "(the whole KV cache unless the mechanism needs less). Decode: how "
           "`attnjax.nn.MultiHeadAttention` decodes: `state` carries that fixed-size recurrent "
           "state, `KV cache` attends over the cached keys and values. Reads: the inputs the "
           "operator reads; the layer creates projections only for those (a mechanism whose "
           "paper derives queries and keys from one stream reads fewer).", "",
           mechanism_table(), "## Summaries", ""]
  for m in registry.list_mechanisms():
    lines.append(f"- `{m.name}`: {m.summary}")
  lines += ["", "# Registered modules", "",
            "Attention modules on other data than a sequence's q, k, v (`attnjax.modules`: "
            "`aj.list_modules()`, `aj.get_module(name).linen()`): feature maps `[B, H, W, C]`, "
            "signals `[B, L, C]`. Gate range: the bound the paper puts on the module's gates, which "
            "`tests/conformance/modules_test.py` checks.", "", module_table(), "## Summaries", ""]
  for m in modules.list_modules():
    lines.append(f"- `{m.name}`: {m.summary}")
  return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def catalog_md() -> str:
  """The whole of docs/CATALOG.md: every seed row, what serves it, or why nothing does."""
  rows = catalog.rows()
  cover = catalog.coverage()
  implementable = [n for n, r in rows.items() if r.kind in catalog.IMPLEMENTABLE_KINDS]
  served = [n for n in implementable if cover[n]]
  apps = [n for n, r in rows.items() if r.kind == "application"]
  apps_served = [n for n in apps if cover[n] or catalog.status(n)[1].startswith("uses ")]
  lines = ["# Catalog", "",
           "Generated by `python -m attnjax.docs` from the package's seed table "
           "(`attnjax/catalog/seeds.tsv`) and what declares it serves each row (mechanism and "
           "module `seeds`, `attnjax.catalog.serves`); do not edit by hand. "
           "`attnjax.catalog.coverage()` returns the same mapping.", "",
           f"Served: {len(served)} of {len(implementable)} implementable rows; "
           f"{len(apps_served)} of {len(apps)} application rows name a general mechanism "
           "that is registered.", "",
           "| # | paper | kind | family | status | served by / reason |",
           "|---|---|---|---|---|---|"]
  for n, r in rows.items():
    state, text = catalog.status(n)
    paper = _cell(r.title) + (f" (arXiv:{r.arxiv})" if r.arxiv else "")
    if state == "served":
      text = ", ".join(f"`{name}`" for name in cover[n])
    lines.append(f"| {n} | {paper} | {r.kind} | {r.family} | {state} | {_cell(text)} |")
  servers = catalog.servers()
  if servers:
    lines += ["", "## Served outside the mechanism registry", "",
              "| name | kind | rows |", "|---|---|---|"]
    lines += [f"| `{s.name}` | {s.kind} | {' '.join(f'#{n}' for n in s.seeds)} |" for s in servers]
  return "\n".join(lines) + "\n"


def readme_with_table(text: str) -> str:
  """`text` with the part between the mechanism markers replaced by the current table."""
  if BEGIN not in text or END not in text:
    raise ValueError(f"README.md lacks the markers {BEGIN} ... {END}")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{mechanism_table()}{END}{tail}"


def main(argv: list[str]) -> int:
  """Rewrites the generated docs; with `--check`, lists the stale ones and returns 1 instead."""
  check = "--check" in argv
  wanted = {MECHANISMS_MD: mechanisms_md(), CATALOG_MD: catalog_md(),
            README: readme_with_table(README.read_text())}
  stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
  if check:
    for p in stale:
      print(f"stale: {p.relative_to(ROOT)} (run `python -m attnjax.docs`)")
    return 1 if stale else 0
  for p in stale:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(wanted[p])
    print(f"wrote {p.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
