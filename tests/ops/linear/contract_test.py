"""The linear family's shared contract (attnjax/core/linear_contract.py): recurrent decoding's
argument checks, `scale` rejection, the documented state contract, and every
operator's typed signature under `jaxtyped`."""

import functools

import beartype
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import linear
from attnjax.ops import linear as lin
from tests.inputs import qkv


def test_recurrent_decode_argument_errors():
  q, k, v = qkv(T=6)
  run = functools.partial(lin.lightning_attention_2, q, k, v)
  with pytest.raises(ValueError, match="causal"):
    run(causal=False, return_final_state=True)
  with pytest.raises(ValueError, match="segment_ids"):
    run(segment_ids=jnp.zeros((2, 6), jnp.int32), return_final_state=True)
  with pytest.raises(ValueError, match="return_final_state"):
    run(initial_state=linear.zero_state(2, 4, 8, 6))
  with pytest.raises(ValueError, match=r"initial_state.*\[B,N,F,h\]"):
    run(initial_state=jnp.zeros((2, 4, 8, 5)), return_final_state=True)
  with pytest.raises(ValueError, match="same length"):
    lin.lightning_attention_2(q[:, :2], k, v, return_final_state=True)
  with pytest.raises(ValueError, match="form='linear'"):
    lin.taylor_shift_attention(q, k, v, causal=True, form="direct", return_final_state=True)


@pytest.mark.parametrize("name", ["cosine_linear_attention", "latte_attention"])
def test_mechanisms_without_a_scale_reject_one(name):
  mech = aj.get_mechanism(name)
  q, k, v = qkv(T=29)
  with pytest.raises(ValueError, match=f"{name}: the paper has no `scale`"):
    mech.fn(q, k, v, scale=0.5, **mech.example_kwargs)


def test_linear_mechanisms_document_the_recurrent_state_contract():
  for mech in aj.list_mechanisms():
    if mech.fn.__module__.startswith(f"{lin.__name__}.") and mech.recurrent:
      doc = " ".join(mech.fn.__doc__.split())
      assert "`initial_state` needs `return_final_state=True`" in doc, mech.name


LINEAR = sorted(m.name for m in aj.list_mechanisms() if m.fn.__module__.startswith(
    f"{lin.__name__}."))


@pytest.mark.parametrize("name", LINEAR)
def test_signature_shapes_hold_under_jaxtyped(name):
  """The operator's jaxtyping annotations hold (GQA, h != H), and a key of the wrong head dim fails
  the shape check before the body runs."""
  mech = aj.get_mechanism(name)
  checked = jaxtyping.jaxtyped(mech.fn, typechecker=beartype.beartype)
  causal = "causal_self" in mech.patterns
  example = {key: jnp.asarray(x) if isinstance(x, np.ndarray) else x
             for key, x in mech.example_kwargs_for(N=4, K=2, H=8, h=6).items()}
  q, k, v = qkv(B=2, T=9, N=4, K=2, H=8, h=6)
  assert checked(q, k, v, causal=causal, **example).shape == (2, 9, 4, 6)
  with pytest.raises(jaxtyping.TypeCheckError):
    checked(q, k[..., :6], v, causal=causal, **example)
