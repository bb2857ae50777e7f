"""Generates `docs/MECHANISMS.md` and the README's mechanism table from the registry.

    python -m attnjax.docs          # rewrite both
    python -m attnjax.docs --check  # exit 1 if either is stale (the test suite checks this too)
"""

from __future__ import annotations

import pathlib
import sys

from attnjax import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
MECHANISMS_MD = ROOT / "docs" / "MECHANISMS.md"
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
  return "state" if m.recurrent else "KV cache"


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
  wanted = {MECHANISMS_MD: mechanisms_md(), README: readme_with_table(README.read_text())}
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
