"""llmjax.hf against transformers: random checkpoints written by transformers, read by hf.load.

Needs the test extra (torch 2.13 CPU + transformers). Logits are compared on real
(non-padding) positions of batches with right padding.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import hf, models

from tests import hf_reference  # needs the test extra: torch (CPU) and transformers

V = 301
TOL = 1e-4


def _batch(seed, B=3, T=12, vocab=V):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (B, T))
  lengths = np.array([T, T - 3, T - 7])[:B]
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
  return tokens, mask


def _assert_close(ours, ref, mask):
  real = mask.astype(bool)
  err = np.abs(np.asarray(ours)[real] - ref[real]).max()
  assert err <= TOL, f"max |difference| {err:.2e} > {TOL}"
  return err


def test_gpt2(tmp_path):
  ref = hf_reference.make_gpt2(str(tmp_path))
  model, params = hf.load(str(tmp_path))
  assert isinstance(model, models.GPT) and model.cfg.vocab_size == V
  tokens, mask = _batch(0)
  logits = model.apply({"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
  assert logits.dtype == jnp.float32
  _assert_close(logits, ref(tokens, mask), mask)


@pytest.mark.parametrize("scan", [False, True])
def test_bert_mlm(tmp_path, scan):
  ref = hf_reference.make_bert_mlm(str(tmp_path))
  model, params = hf.load(str(tmp_path), scan_layers=scan)
  assert model.cfg.head == "mlm" and model.cfg.scan_layers == scan
  tokens, mask = _batch(1)
  types = (np.arange(tokens.shape[1])[None] >= 5).astype(np.int64).repeat(3, 0)
  logits = model.apply({"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(mask),
                       token_types=jnp.asarray(types))
  _assert_close(logits, ref(tokens, mask, types), mask)


def test_bert_model_hidden_and_pooler(tmp_path):
  ref = hf_reference.make_bert_model(str(tmp_path))
  model, params = hf.load(str(tmp_path))
  assert model.cfg.head == "none" and model.cfg.pooler
  tokens, mask = _batch(2)
  types = np.zeros_like(tokens)
  hidden = model.apply({"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(mask),
                       token_types=jnp.asarray(types))
  ref_hidden, ref_pooled = ref(tokens, mask, types)
  assert hidden.shape == ref_hidden.shape
  _assert_close(hidden, ref_hidden, mask)
  pooled = model.apply({"params": params}, hidden, method="pooled")
  np.testing.assert_allclose(pooled, ref_pooled, atol=TOL)


@pytest.mark.parametrize("version,legacy", [("1.0", False), ("1.1", False), ("1.1", True)])
def test_t5(tmp_path, version, legacy):
  ref = hf_reference.make_t5(str(tmp_path), version, legacy_config=legacy)
  model, params = hf.load(str(tmp_path))
  cfg = model.cfg
  assert (cfg.gated, cfg.tie_embeddings, cfg.scale_logits) == (
      (False, True, True) if version == "1.0" else (True, False, False))
  assert cfg.num_layers != cfg.decoder_layers  # the reference has 3 encoder, 2 decoder layers
  enc, emask = _batch(3, T=14)
  dec, dmask = _batch(4, T=9)
  logits = model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec),
                       encoder_segment_ids=jnp.asarray(emask), decoder_segment_ids=jnp.asarray(dmask))
  _assert_close(logits, ref(enc, emask, dec, dmask), dmask)


def test_loaded_params_follow_param_dtype(tmp_path):
  hf_reference.make_gpt2(str(tmp_path))
  model, params = hf.load(str(tmp_path), dtype="bfloat16", param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  tokens, mask = _batch(5)
  logits = model.apply({"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


# ---- bad checkpoints: clear errors that name the problem ------------------------------------


def _rewrite(path, drop=None, reshape=None, config=None):
  """Rewrites a saved checkpoint: drop or reshape one tensor, or patch config.json."""
  from safetensors.numpy import save_file
  cfg, tensors = hf.read_checkpoint(str(path))
  if drop:
    del tensors[drop]
  if reshape:
    tensors[reshape] = tensors[reshape][..., :-1]
  save_file(tensors, os.path.join(path, "model.safetensors"))
  if config:
    cfg.update(config)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg, f)


def test_missing_tensor_is_named(tmp_path):
  hf_reference.make_gpt2(str(tmp_path))
  _rewrite(tmp_path, drop="transformer.h.2.ln_2.bias")
  with pytest.raises(ValueError, match=r"missing tensor 'transformer\.h\.2\.ln_2\.bias'"):
    hf.load(str(tmp_path))


def test_misshaped_tensor_is_named(tmp_path):
  hf_reference.make_t5(str(tmp_path), "1.1")
  name = "decoder.block.1.layer.2.DenseReluDense.wi_1.weight"
  _rewrite(tmp_path, reshape=name)
  with pytest.raises(ValueError, match=rf"{name}.*shape \(128, 63\).*\(128, 64\)"):
    hf.load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
  hf_reference.make_bert_model(str(tmp_path))
  _rewrite(tmp_path, config={"architectures": ["BertForTokenClassification"]})
  with pytest.raises(ValueError, match="unsupported checkpoint architecture "
                     "'BertForTokenClassification'"):
    hf.load(str(tmp_path))


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    hf.load(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ValueError, match="no model.safetensors"):
    hf.load(str(tmp_path))


def test_convert_tool_writes_a_loadable_checkpoint(tmp_path):
  import subprocess
  import sys
  from llmjax import checkpoint
  hf_dir, out_dir = tmp_path / "hf", tmp_path / "ckpt"
  ref = hf_reference.make_t5(str(hf_dir), "1.1")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join(root, "tools", "convert_hf.py"),
                         f"--hf_dir={hf_dir}", f"--out_dir={out_dir}", "--scan_layers"],
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "wrote T5" in proc.stdout
  model, params = checkpoint.load_model(str(out_dir))
  assert isinstance(model, models.T5) and model.cfg.scan_layers
  enc, emask = _batch(6, T=10)
  dec, dmask = _batch(7, T=7)
  logits = model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec),
                       encoder_segment_ids=jnp.asarray(emask), decoder_segment_ids=jnp.asarray(dmask))
  _assert_close(logits, ref(enc, emask, dec, dmask), dmask)


def test_unused_tensors_are_reported(tmp_path, caplog):
  from safetensors.numpy import save_file
  hf_reference.make_bert_mlm(str(tmp_path))
  cfg, tensors = hf.read_checkpoint(str(tmp_path))
  tensors["cls.seq_relationship.weight"] = np.zeros((2, 64), np.float32)
  save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
  hf.load(str(tmp_path))
  assert "cls.seq_relationship.weight" in caplog.text


def test_unknown_tensors_are_an_error(tmp_path):
  from safetensors.numpy import save_file
  hf_reference.make_gpt2(str(tmp_path))
  cfg, tensors = hf.read_checkpoint(str(tmp_path))
  tensors["transformer.h.0.crossattention.c_attn.weight"] = np.zeros((64, 128), np.float32)
  save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"no place for: \['transformer\.h\.0\.crossattention"):
    hf.load(str(tmp_path))


def test_options_that_change_the_math_are_rejected(tmp_path):
  hf_reference.make_bert_model(str(tmp_path))
  _rewrite(tmp_path, config={"is_decoder": True})
  with pytest.raises(ValueError, match="unsupported BERT option is_decoder=True"):
    hf.load(str(tmp_path))
  _rewrite(tmp_path, config={"is_decoder": False, "hidden_act": "mish"})
  with pytest.raises(ValueError, match="unsupported activation hidden_act='mish'"):
    hf.load(str(tmp_path))


def test_only_run_time_fields_can_be_overridden(tmp_path):
  hf_reference.make_gpt2(str(tmp_path))
  model, _ = hf.load(str(tmp_path), dropout_rate=0.0, remat_policy="full")
  assert (model.cfg.dropout_rate, model.cfg.remat_policy) == (0.0, "full")
  with pytest.raises(ValueError, match=r"cannot override \['norm_eps'\]"):
    hf.load(str(tmp_path), norm_eps=1e-6)
