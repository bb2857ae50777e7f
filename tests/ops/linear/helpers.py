"""Shared helpers of the linear family's tests: the implementations a mechanism lists, GQA head
expansion, explicit weighted sums and the float32 tolerance check."""

import jax.numpy as jnp

import attnjax as aj
from tests import tolerances

IMPLS = ("xla", "parallel", "reference")


def impls(name):
  """The implementations a mechanism lists (non-causal ones have two: linear and quadratic)."""
  return aj.get_mechanism(name).implementations


def heads(x, N):
  """[B,S,K,*] -> [B,S,N,*] (GQA: each kv head serves N // K query heads)."""
  return jnp.repeat(x, N // x.shape[2], axis=2)


def weighted(w, v):
  """`Σ_s w[b,n,t,s] v[b,s,n,:]` -> [B,T,N,h]."""
  return jnp.einsum("bnts,bsnh->btnh", w, v.astype(jnp.float32))


def causal_mask(T, S=None):
  """`[T, S]` lower-triangular visibility (S = T by default)."""
  return jnp.tril(jnp.ones((T, T if S is None else S), bool))


def assert_rel(a, b, tol=tolerances.REL_RMS[jnp.float32]):
  err = tolerances.rel_rms(a, b)
  assert err < tol, err
