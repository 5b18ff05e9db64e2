"""GPT, BERT and T5 with attention_impl="pallas" (the kernel, interpreted on CPU) give the
loss and gradients of "xla", on one device and sharded on a (2, 2, 2) mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import models
from llmjax import sharding as sh

B, V = 4, 96


def _config(family: str, impl: str):
  common = dict(vocab_size=V, num_layers=1, num_heads=2, dropout_rate=0.0, attention_impl=impl)
  if family == "gpt":
    return models.GPTConfig.from_size("tiny", d_model=128, max_seq_len=128, **common)
  if family == "gpt_gqa":  # one kv head: the tensor axis (2) cannot split it
    return models.GPTConfig.from_size("tiny", d_model=128, max_seq_len=128, num_kv_heads=1,
                                      **common)
  if family == "bert":
    return models.BertConfig.from_size("tiny", d_model=128, max_seq_len=128, **common)
  return models.T5Config.from_size("tiny", d_model=128, head_dim=64, **common)


def _segments(rng, T: int):
  """Each row: two or three packed sequences, then padding (segment 0)."""
  rows = []
  for _ in range(B):
    cuts = np.sort(rng.choice(np.arange(8, T - 8), 2, replace=False))
    pad = int(rng.integers(0, 12))
    row = np.concatenate([np.full(cuts[0], 1), np.full(cuts[1] - cuts[0], 2),
                          np.full(T - cuts[1], 3)])
    row[T - pad:] = 0
    rows.append(row)
  return jnp.asarray(np.stack(rows), jnp.int32)


def _batch(family: str):
  rng = np.random.default_rng(0)
  tokens = lambda T: jnp.asarray(rng.integers(1, V, (B, T)), jnp.int32)
  if family == "t5":
    return {"enc": tokens(96), "dec": tokens(80), "enc_seg": _segments(rng, 96),
            "dec_seg": _segments(rng, 80), "targets": tokens(80)}
  return {"tokens": tokens(100), "seg": _segments(rng, 100), "targets": tokens(100)}


def _loss(model, family, params, batch):
  if family == "t5":
    logits = model.apply({"params": params}, batch["enc"], batch["dec"], batch["enc_seg"],
                         batch["dec_seg"])
    weights = batch["dec_seg"] > 0
  else:
    logits = model.apply({"params": params}, batch["tokens"], segment_ids=batch["seg"])
    weights = batch["seg"] > 0
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  return jnp.sum(nll * weights) / jnp.sum(weights)


@functools.cache
def _params(family):
  """The family's initial parameters (one init per process for both parametrizations)."""
  batch = _batch(family)
  xla_model = models.model_from_dict(models.config_to_dict(_config(family, "xla")))
  init_args = (batch["enc"], batch["dec"]) if family == "t5" else (batch["tokens"],)
  # An rbg key: its init compiles several times faster than threefry's, and any weights do.
  return nn.unbox(jax.jit(xla_model.init)(jax.random.key(0, impl="rbg"), *init_args)["params"])


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("family", ["gpt", "gpt_gqa", "bert", "t5"])
def test_pallas_equals_xla(family, sharded):
  batch = _batch(family)
  xla_model = models.model_from_dict(models.config_to_dict(_config(family, "xla")))
  init_args = (batch["enc"], batch["dec"]) if family == "t5" else (batch["tokens"],)
  params = _params(family)
  results = {}
  for impl in ("xla", "pallas"):
    model = models.model_from_dict(models.config_to_dict(_config(family, impl)))
    grad_fn = jax.value_and_grad(lambda p: _loss(model, family, p, batch))
    if sharded:
      mesh = sh.make_mesh((2, 2, 2))
      with jax.set_mesh(mesh), nn.logical_axis_rules(sh.RULES):
        boxed = jax.eval_shape(xla_model.init, jax.random.key(0), *init_args)["params"]
      placed = jax.device_put(params, sh.logical_sharding(boxed, mesh))
      with jax.set_mesh(mesh), nn.logical_axis_rules(sh.RULES):
        results[impl] = jax.jit(grad_fn)(placed)
    else:
      results[impl] = jax.jit(grad_fn)(params)
  (loss_x, grads_x), (loss_p, grads_p) = results["xla"], results["pallas"]
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)
  for path, gx in jax.tree_util.tree_leaves_with_path(grads_x):
    gp = _at(grads_p, path)
    np.testing.assert_allclose(gp, gx, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(gx)))),
                               err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree
