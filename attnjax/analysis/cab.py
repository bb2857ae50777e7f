"""CAB's attention-pattern matrix over the registry: which of the four patterns CAB benchmarks every
efficient attention on each registered mechanism serves.

CAB ("CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling", Zhang et al.,
arXiv:2210.07661) sorts long-sequence tasks by the attention pattern they need, noncausal self (NS),
causal self (CS), noncausal cross (NC) and causal cross (CC), and prints for each efficient attention
the patterns it can run. Here the matrix is read from the registry (`Mechanism.patterns`), whose
every entry the conformance suite runs under each pattern it declares, and whose call raises a clear
error under any other (`Mechanism.check_pattern`):

    matrix = pattern_matrix()                    # {name: {"NS": True, "CS": False, ...}}
    print(markdown(matrix))                      # CAB's table: ✓ / ✗ per pattern
"""

from __future__ import annotations

from typing import Optional

from attnjax import catalog
from attnjax import registry

__all__ = ["CAB_PATTERNS", "markdown", "pattern_matrix"]

# CAB's column order and abbreviations -> the registry's pattern names.
CAB_PATTERNS = {"NS": "self", "CS": "causal_self", "NC": "cross", "CC": "causal_cross"}


@catalog.serves(205, kind="analysis", name="attnjax.analysis.cab.pattern_matrix")
def pattern_matrix(family: Optional[str] = None) -> dict[str, dict[str, bool]]:
  """`{mechanism: {"NS" | "CS" | "NC" | "CC": served}}` for every registered mechanism (of `family`),
  sorted by name."""
  return {m.name: {abbr: pattern in m.patterns for abbr, pattern in CAB_PATTERNS.items()}
          for m in registry.list_mechanisms(family)}


def markdown(matrix: dict[str, dict[str, bool]]) -> str:
  """CAB's table: one row per mechanism with its family, ✓ / ✗ per pattern, and a last row counting
  the mechanisms that serve each pattern."""
  lines = ["| mechanism | family | " + " | ".join(CAB_PATTERNS) + " |",
           "| --- | --- | " + " | ".join(":-:" for _ in CAB_PATTERNS) + " |"]
  for name, served in matrix.items():
    marks = " | ".join("✓" if served[p] else "✗" for p in CAB_PATTERNS)
    lines.append(f"| `{name}` | {registry.get(name).family} | {marks} |")
  totals = " | ".join(str(sum(s[p] for s in matrix.values())) for p in CAB_PATTERNS)
  lines.append(f"| all {len(matrix)} | | {totals} |")
  return "\n".join(lines)
