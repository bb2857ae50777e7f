"""CAB's pattern matrix (#205): every registered mechanism's row agrees with what its call accepts
(a served pattern passes the pattern check, any other raises the clear error), the table prints CAB's
four columns with counts, and a family filter keeps only that family."""

import pytest

import attnjax as aj
from attnjax.analysis import cab


def test_matrix_agrees_with_the_pattern_check_of_every_mechanism():
  matrix = cab.pattern_matrix()
  assert sorted(matrix) == sorted(m.name for m in aj.list_mechanisms())
  for name, served in matrix.items():
    mech = aj.get_mechanism(name)
    for abbr, pattern in cab.CAB_PATTERNS.items():
      causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
      if served[abbr]:
        mech.check_pattern(causal=causal, cross=cross)
      else:
        with pytest.raises(ValueError, match="does not support"):
          mech.check_pattern(causal=causal, cross=cross)
  # Softmax attention serves all four; a causal-only recurrence does not serve noncausal self.
  assert all(matrix["softmax"].values())
  assert not all(all(s.values()) for s in matrix.values())


def test_markdown_has_cabs_columns_and_totals():
  matrix = cab.pattern_matrix(family="softmax-core")
  assert matrix and all(aj.get_mechanism(n).family == "softmax-core" for n in matrix)
  table = cab.markdown(matrix)
  assert table.splitlines()[0] == "| mechanism | family | NS | CS | NC | CC |"
  assert "| `softmax` | softmax-core | ✓ | ✓ | ✓ | ✓ |" in table
  counts = table.splitlines()[-1].split("|")[3:7]
  assert [int(c) for c in counts] == [sum(s[p] for s in matrix.values()) for p in cab.CAB_PATTERNS]
