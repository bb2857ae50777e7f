"""Registry records against the seed catalog, and the public entry points."""

import csv
import pathlib

import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax import registry

CATALOG = pathlib.Path(__file__).resolve().parents[2] / "shared" / "seeds" / "catalog.tsv"


def test_public_names_exist():
  for name in ("flex_attention", "dot_product_attention", "create_block_mask",
               "merge_attention_states", "masks", "attention", "get_mechanism", "list_mechanisms"):
    assert hasattr(aj, name), name


@pytest.mark.skipif(not CATALOG.exists(), reason="seed catalog not beside the checkout")
def test_seeds_are_catalog_rows_that_propose_mechanisms():
  rows = {int(r["n"]): r for r in csv.DictReader(CATALOG.open(), delimiter="\t")}
  for m in aj.list_mechanisms():
    for seed in m.seeds:
      assert seed in rows, f"{m.name}: seed #{seed} is not a catalog row"
      assert rows[seed]["kind"] != "application", f"{m.name}: #{seed} is an application paper"


def test_register_rejects_duplicates_missing_seeds_and_bad_patterns():
  m = aj.get_mechanism("softmax")
  with pytest.raises(ValueError, match="already registered"):
    registry.register(m)
  import dataclasses
  with pytest.raises(ValueError, match="seeds"):
    registry.register(dataclasses.replace(m, name="tmp_no_seeds", seeds=()))
  with pytest.raises(ValueError, match="unknown patterns"):
    registry.register(dataclasses.replace(m, name="tmp_bad", patterns=frozenset({"diagonal"})))
  with pytest.raises(ValueError, match="recurrent"):
    registry.register(dataclasses.replace(m, name="tmp_recurrent", recurrent=True, decode=False))


def test_attention_by_name_equals_the_function():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 2, 4))
  out = aj.attention("softmax", q, q, q, causal=True)
  ref = aj.dot_product_attention(q, q, q, causal=True)
  assert jnp.allclose(out, ref)


def test_missing_learned_params_is_a_clear_error():
  import dataclasses
  m = dataclasses.replace(aj.get_mechanism("softmax"), params=(
      registry.ParamSpec("gate", lambda n, k, h: (n,), jax.nn.initializers.zeros),))
  q = jnp.ones((1, 4, 2, 4))
  with pytest.raises(ValueError, match="gate"):
    m(q, q, q)


def test_decode_state_sizes():
  """Softmax keeps the whole KV cache; a recurrence keeps a state independent of T."""
  softmax = aj.get_mechanism("softmax")
  assert softmax.decode_state_floats(100, 8, 2, 64, 32) == 100 * 2 * (64 + 32)
  lightning = aj.get_mechanism("lightning_attention_2")
  sizes = {lightning.decode_state_floats(T, 8, 2, 64, 32) for T in (1, 1000, 10**6)}
  assert sizes == {8 * 64 * 32}


def test_importing_attnjax_starts_no_jax_backend():
  """Multi-host runs call jax.distributed.initialize after importing configs and attnjax, so the
  import must not touch a backend (registry examples that need JAX are functions, built lazily)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import attnjax; from jax._src import xla_bridge; "
          "print(len(attnjax.list_mechanisms()), sorted(xla_bridge._backends))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
  count, backends = out.stdout.split(" ", 1)
  assert int(count) > 0 and backends.strip() == "[]", out.stdout


def test_param_shapes_read_the_settings_they_name():
  """A ParamSpec whose shape depends on a mechanism keyword names it in `settings`: the shape reads
  that keyword from the settings (other keywords and None values are ignored, defaults apply)."""
  spec = registry.ParamSpec("table", lambda N, K, H, window=3: (N, 2 * window + 1),
                            jax.nn.initializers.zeros,
                            settings=("window",))
  assert spec.shape_for(4, 2, 8) == (4, 7)
  assert spec.shape_for(4, 2, 8, {"window": 5, "other": 1}) == (4, 11)
  assert spec.shape_for(4, 2, 8, {"window": None}) == (4, 7)
  assert registry.example_params((spec,), N=2, settings={"window": 1})["table"].shape == (2, 3)
