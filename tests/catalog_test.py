"""The package's seed table and coverage: every row is accounted for, what serves a row declares it
where it is defined, and the table agrees with the shared seed catalog where that is beside the
checkout."""

import csv
import pathlib

import pytest

import attnjax as aj
from attnjax import catalog

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "seeds" / "catalog.tsv"


def test_every_row_is_covered_or_has_a_status():
  rows = catalog.rows()
  assert sorted(rows) == list(range(1, 243))
  cover = catalog.coverage()
  assert sorted(cover) == sorted(rows)
  names = ({m.name for m in aj.list_mechanisms()} | {m.name for m in aj.list_modules()}
           | {s.name for s in catalog.servers()})
  for n, served_by in cover.items():
    assert set(served_by) <= names, (n, served_by)
    state, text = catalog.status(n)
    assert state in ("served", "application", "not served") and text, n
    assert (state == "served") == bool(served_by), n


def test_mechanisms_and_modules_serve_the_rows_they_name():
  cover = catalog.coverage()
  for m in [*aj.list_mechanisms(), *aj.list_modules()]:
    for seed in m.seeds:
      assert m.name in cover[seed]
  assert cover[77] == ["forgetting_attention"]
  assert cover[188] == ["eca_channel_attention"]
  assert catalog.status(43)[0] == "not served" and "equations" in catalog.status(43)[1]


def test_a_declared_server_appears_in_coverage(monkeypatch):
  monkeypatch.setattr(catalog, "_SERVERS", {})

  @catalog.serves(16, kind="layer")
  class Projection:  # pylint: disable=unused-variable
    pass

  catalog.register_server("model.some_option", (174,), kind="model option")
  cover = catalog.coverage()
  assert "tests.catalog_test.test_a_declared_server_appears_in_coverage.<locals>.Projection" in \
      cover[16]
  assert cover[174][-1] == "model.some_option"
  with pytest.raises(ValueError, match="catalog rows"):
    catalog.register_server("bad", (999,), kind="layer")


@pytest.mark.skipif(not SHARED.exists(), reason="seed catalog not beside the checkout")
def test_table_agrees_with_the_shared_seed_catalog():
  shared = {int(r["n"]): r for r in csv.DictReader(SHARED.open(), delimiter="\t")}
  rows = catalog.rows()
  assert sorted(shared) == sorted(rows)
  for n, r in rows.items():
    assert (r.title, r.kind, r.family, r.operator_name) == (
        shared[n]["title"].strip(), shared[n]["kind"], shared[n]["family"],
        shared[n]["operator_name"]), n


def test_unknown_mechanism_names_the_closest_not_all():
  with pytest.raises(ValueError, match="did you mean 'softpick_attention'") as err:
    aj.get_mechanism("softpik_attention")
  assert "list_mechanisms()" in str(err.value) and "cog_attention" not in str(err.value)
