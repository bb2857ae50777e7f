"""The generated docs stay current with the registry."""

from attnjax import docs


def test_mechanisms_md_is_current():
  assert docs.MECHANISMS_MD.read_text() == docs.mechanisms_md(), "run `python -m attnjax.docs`"


def test_readme_table_is_current():
  text = docs.README.read_text()
  assert docs.readme_with_table(text) == text, "run `python -m attnjax.docs`"


def test_every_mechanism_is_listed():
  table = docs.mechanism_table()
  for m in docs.registry.list_mechanisms():
    assert f"`{m.name}`" in table


def test_catalog_md_is_current():
  assert docs.CATALOG_MD.read_text() == docs.catalog_md(), "run `python -m attnjax.docs`"
