"""Mesh shapes, logical-axis shardings and per-process batch rows on the devices of this process."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from attnjax.parallel import mesh as mesh_lib
from tests.train import fakes_test


def test_mesh_shape_fills_the_remaining_axis_and_defaults_to_one():
  assert mesh_lib.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {
      "data": 2, "fsdp": 2, "tensor": 2, "context": 1}
  assert mesh_lib.mesh_shape(None, 4) == {"data": 4, "fsdp": 1, "tensor": 1, "context": 1}


@pytest.mark.parametrize("mesh, devices", [
    ({"data": 4}, 2),                  # larger than the device count
    ({"data": 2, "tensor": 2}, 8),     # smaller, and no -1 axis to take the rest
    ({"data": -1, "fsdp": 3}, 8),      # 3 does not divide 8
    ({"data": -1, "fsdp": -1}, 8),
    ({"data": 0}, 1),
    ({"pipeline": 2}, 2),
])
def test_bad_mesh_raises_naming_mesh(mesh, devices):
  with pytest.raises(ValueError, match="mesh"):
    mesh_lib.mesh_shape(mesh, devices)


def test_logical_shardings_follow_the_rules():
  mesh = mesh_lib.make_mesh({"data": -1})
  model = fakes_test.TinyLM()
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)))
  shardings = mesh_lib.logical_shardings(boxed, mesh, fakes_test.RULES)
  specs = jax.tree.map(lambda s: s.spec, shardings["params"])
  # ("embed", "mlp") -> ("fsdp", "tensor"); the spec is kept even where an axis has size 1.
  assert specs["mlp_in"]["kernel"] == P("fsdp", "tensor")
  assert specs["embed"] == P("tensor", "fsdp")
  assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(boxed))


def test_fit_spec_replicates_dimensions_an_axis_does_not_divide():
  # _fit_spec reads only mesh.shape: a 4-way fsdp axis without 4 devices.
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2, "context": 1})
  fit = mesh_lib._fit_spec  # pylint: disable=protected-access
  assert fit(P("fsdp", None), (10, 3), mesh) == P(None, None)  # 10 classes over 4: replicated
  assert fit(P("fsdp"), (8, 3), mesh) == P("fsdp", None)
  assert fit(P(("fsdp", "tensor")), (4,), mesh) == P("fsdp")  # keeps the axes that divide
