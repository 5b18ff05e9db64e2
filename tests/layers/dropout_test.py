"""llmjax.layers.dropout: four 16-bit draws per threefry hash; the rate and the mean hold, the
draws are independent, the mask does not depend on sharding; anything else falls back to
jax.random.bernoulli."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import layers
from llmjax.layers import dropout as dropout_lib


def test_rate_mean_and_independence():
  rate, shape = 0.1, (64, 8, 512)
  mask, keep = jax.jit(dropout_lib.keep_mask, static_argnums=(1, 2))(
      jax.random.key(0), rate, shape)
  mask = np.asarray(mask)
  assert keep == 1 - round(rate * 2**16) / 2**16 and abs(keep - (1 - rate)) < 2**-17
  n = mask.size
  assert abs(1 - mask.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
  # Neighbours share a hash (four draws each): both dropped as often as independent draws.
  for a, b in ((mask[..., 0::4], mask[..., 1::4]), (mask[..., 1::4], mask[..., 2::4]),
               (mask[..., 0::4], mask[..., 3::4]), (mask[..., :-4], mask[..., 4:])):
    both = (~a & ~b).mean()
    assert abs(both - rate**2) < 5 * np.sqrt(rate**2 / a.size), both
  x = jnp.ones(shape, jnp.float32)
  y = np.asarray(dropout_lib.dropout(x, rate, jax.random.key(0)))
  np.testing.assert_array_equal(y != 0, mask)
  np.testing.assert_allclose(y[mask], 1 / keep, rtol=1e-7)
  assert abs(y.mean() - 1) < 4 * np.sqrt(rate / (1 - rate) / n)


def test_keys_and_layouts():
  key = jax.random.key(3)
  first = dropout_lib.keep_mask(key, 0.5, (4, 16))[0]
  np.testing.assert_array_equal(first, dropout_lib.keep_mask(key, 0.5, (4, 16))[0])
  assert (first != dropout_lib.keep_mask(jax.random.key(4), 0.5, (4, 16))[0]).any()
  raw = jax.random.key_data(key)  # a raw uint32 key is the same threefry key
  np.testing.assert_array_equal(first, dropout_lib.keep_mask(raw, 0.5, (4, 16))[0])
  # Other implementations, and last axes not a multiple of 4, are jax.random.bernoulli's.
  for k, shape in ((key, (4, 7)), (key, ()), (jax.random.key(3, impl="rbg"), (4, 16))):
    mask, keep = dropout_lib.keep_mask(k, 0.5, shape)
    np.testing.assert_array_equal(mask, jax.random.bernoulli(k, keep, shape))
  assert dropout_lib.dropout(jnp.ones(8), 1.0, key).sum() == 0
  np.testing.assert_array_equal(dropout_lib.dropout(jnp.arange(8.0), 0.0, key), jnp.arange(8.0))


@pytest.mark.parametrize("spec", [P("data"), P(None, None, "data")])
def test_the_mask_is_the_same_however_the_array_is_sharded(spec):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jnp.arange(16 * 3 * 64, dtype=jnp.float32).reshape(16, 3, 64) + 1
  drop = lambda x: dropout_lib.dropout(x, 0.25, jax.random.key(7))
  alone = jax.jit(drop)(x)
  sharded = jax.jit(drop, out_shardings=NamedSharding(mesh, spec))(
      jax.device_put(x, NamedSharding(mesh, spec)))
  np.testing.assert_array_equal(sharded, alone)


def test_module_acts_only_when_not_deterministic():
  module = layers.Dropout(0.5)
  x = jnp.ones((2, 8))
  np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
  y = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert set(np.unique(np.asarray(y)).tolist()) <= {0.0, 2.0} and (y == 0).any()
