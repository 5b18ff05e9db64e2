"""llmjax.peft against PEFT and transformers: classification heads, LoRA's identities, the
adapter files both ways (BERT, GPT-2's fused c_attn, T5), scanned layers. Needs the test extra."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from peft import LoraConfig as PeftConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel, T5Config,
                          T5ForConditionalGeneration)

from llmjax import data, hf, models, objectives, peft
from tests import hf_reference

V, B, T = 101, 3, 10


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, V, (B, T))
  mask = np.ones_like(tokens)
  mask[1, 6:] = 0
  tokens[mask == 0] = 0  # the pad id: GPT-2's classifier finds each row's last token by it
  types = (np.arange(T) >= 5).astype(np.int64)[None].repeat(B, 0)
  return tokens, mask, types


def _bert(path, **kw):
  cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, num_labels=3, **kw)
  model = hf_reference._build(BertForSequenceClassification, cfg, 0)
  hf_reference._save(model, path)
  return model


def _gpt2(path, cls=GPT2ForSequenceClassification):
  cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, num_labels=2,
                   pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = hf_reference._build(cls, cfg, 1)
  hf_reference._save(model, path)
  return model


def _t5(path):
  cfg = T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 dropout_rate=0.0, decoder_start_token_id=0)
  model = hf_reference._build(T5ForConditionalGeneration, cfg, 2)
  hf_reference._save(model, path)
  return model


def _torch(model, family, tokens, mask, types):
  """The torch model's logits (classification [B, C]; GPT-2 LM and T5 [B, T, V])."""
  t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.long)
  with torch.no_grad():
    if family == "t5":
      return model(input_ids=t(tokens), attention_mask=t(mask), decoder_input_ids=t(tokens),
                   decoder_attention_mask=t(mask)).logits.numpy()
    kw = {"token_type_ids": t(types)} if family == "bert" else {}
    return model(input_ids=t(tokens), attention_mask=t(mask), **kw).logits.numpy()


def _ours(model, params, family, tokens, mask, types):
  j = jnp.asarray
  if family == "t5":
    return np.asarray(model.apply({"params": params}, j(tokens), j(tokens), j(mask), j(mask)))
  kw = {"token_types": j(types)} if family == "bert" else {}
  return np.asarray(model.apply({"params": params}, j(tokens), segment_ids=j(mask), **kw))


def _close(ours, ref, mask, family, tol):
  real = mask.astype(bool) if ours.ndim == 3 else slice(None)
  err = np.abs(ours[real] - ref[real]).max()
  assert err <= tol, f"{family}: max |difference| {err:.2e} > {tol}"


def _perturb(params, seed=1, scale=0.1):
  """Every adapter B (and head) moved off its init, so an adapter changes the outputs."""
  flat = traverse_util.flatten_dict(params, sep="/")
  key = jax.random.key(seed)
  for k in sorted(flat):
    if k.endswith("_lora_b") or k.startswith("classifier/"):
      key, sub = jax.random.split(key)
      flat[k] = flat[k] + scale * jax.random.normal(sub, flat[k].shape, flat[k].dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_sequence_classification_matches_transformers(tmp_path, family):
  ref = (_bert if family == "bert" else _gpt2)(str(tmp_path))
  model, params = hf.load(str(tmp_path))
  assert model.cfg.head == "classify" and model.cfg.num_labels == ref.config.num_labels
  inputs = _inputs()
  logits = _ours(model, params, family, *inputs)
  assert logits.shape == (B, ref.config.num_labels) and logits.dtype == np.float32
  _close(logits, _torch(ref, family, *inputs), inputs[1], family, 1e-4)
  # The classification objective's loss is transformers' for the same batch and labels.
  labels = np.arange(B) % ref.config.num_labels
  objective = objectives.Classification(data.ByteTokenizer(), T, num_labels=ref.config.num_labels,
                                        architecture=model.ARCHITECTURE)
  loss, _ = objective.loss(jnp.asarray(logits), {"targets": jnp.asarray(labels),
                                                 "weights": jnp.ones(B, jnp.float32)})
  t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.long)
  with torch.no_grad():
    kw = {"token_type_ids": t(inputs[2])} if family == "bert" else {}
    want = ref(input_ids=t(inputs[0]), attention_mask=t(inputs[1]), labels=t(labels), **kw).loss
  assert abs(float(loss) - float(want)) < 1e-5


def test_lora_identities_and_counts(tmp_path):
  ref = _bert(str(tmp_path))
  model, params = hf.load(str(tmp_path))
  tokens, mask, types = _inputs()
  lora = peft.wrap(model, peft.LoraConfig(rank=8, alpha=16.0))
  args, kwargs = (jnp.asarray(tokens),), dict(segment_ids=jnp.asarray(mask),
                                               token_types=jnp.asarray(types))
  with_adapters = peft.add_adapters(lora, params, args, kwargs)
  base = _ours(model, params, "bert", tokens, mask, types)
  assert np.array_equal(_ours(lora, with_adapters, "bert", tokens, mask, types), base)
  moved = _perturb(with_adapters)
  unmerged = _ours(lora, moved, "bert", tokens, mask, types)
  assert np.abs(unmerged - base).max() > 1e-3
  plain, merged = peft.merge(lora, moved)
  assert not hasattr(plain, "lora")
  np.testing.assert_allclose(_ours(plain, merged, "bert", tokens, mask, types), unmerged, atol=1e-5)
  # Adapter sizes as PEFT's for the same targets (PEFT also counts the classifier it trains).
  adapters = sum(v.size for k, v in traverse_util.flatten_dict(with_adapters, sep="/").items()
                 if peft.is_adapter(k))
  head = sum(p.numel() for n, p in ref.named_parameters() if n.startswith("classifier."))
  theirs = get_peft_model(ref, PeftConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16))
  assert adapters + head == theirs.get_nb_trainable_parameters()[0]
  # BERT-base, query + value at r=8: PEFT's 294,912, from shapes alone.
  big = peft.wrap(models.Bert(models.BertConfig.from_size("base")), peft.LoraConfig(rank=8))
  shapes = jax.eval_shape(big.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  flat = traverse_util.flatten_dict(nn_unbox(shapes), sep="/")
  assert sum(int(np.prod(v.shape)) for k, v in flat.items() if peft.is_adapter(k)) == 294_912


def nn_unbox(tree):
  from flax import linen as nn
  return nn.meta.unbox(tree)


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_adapters_cross_to_peft_and_back(tmp_path, family):
  """Ours -> PEFT: same logits; PEFT's (its own defaults, B moved) -> ours: same logits."""
  make = {"bert": _bert, "gpt": lambda p: _gpt2(p, GPT2LMHeadModel), "t5": _t5}[family]
  ref = make(str(tmp_path / "base"))
  model, params = hf.load(str(tmp_path / "base"))
  inputs = _inputs()
  tokens, mask, types = inputs
  # Ours, exported: GPT-2's q, k, v go out as one c_attn of rank 3r.
  lora = peft.wrap(model, peft.LoraConfig(rank=4, alpha=8.0, train="(?!)" if family != "bert"
                                          else "classifier/.*"))
  example = ((jnp.asarray(tokens), jnp.asarray(tokens)) if family == "t5"
             else (jnp.asarray(tokens),))
  ours = _perturb(peft.add_adapters(lora, params, example))
  peft.save_adapter(lora, ours, str(tmp_path / "ours"))
  config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4
  loaded = PeftModel.from_pretrained(type(ref).from_pretrained(str(tmp_path / "base")),
                                     str(tmp_path / "ours")).eval()
  _close(_ours(lora, ours, family, *inputs), _torch(loaded, family, *inputs), mask, family, 1e-5)
  # PEFT's, imported.
  task = {"bert": TaskType.SEQ_CLS, "gpt": TaskType.CAUSAL_LM, "t5": TaskType.SEQ_2_SEQ_LM}[family]
  theirs = get_peft_model(type(ref).from_pretrained(str(tmp_path / "base")),
                          PeftConfig(task_type=task, r=4, lora_alpha=16))
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        p.add_(0.1 * torch.randn_like(p))
  theirs.save_pretrained(str(tmp_path / "theirs"))
  imported, imported_params = peft.load_adapter(model, params, str(tmp_path / "theirs"))
  _close(_ours(imported, imported_params, family, *inputs), _torch(theirs.eval(), family, *inputs),
         mask, family, 1e-5)


def test_adapters_reach_t5s_encode_and_decoder_logits():
  """decode.generate runs a T5 through `encode` and `decoder_logits`: the adapters act there as
  in __call__."""
  model = models.T5(models.T5Config(vocab_size=V, d_model=32, num_layers=1, num_heads=2,
                                    d_ff=64))
  lora = peft.wrap(model, peft.LoraConfig(rank=2))
  tokens = jnp.asarray(_inputs()[0])
  params = nn_unbox(model.init(jax.random.key(0), tokens, tokens)["params"])
  moved = _perturb(peft.add_adapters(lora, params, (tokens, tokens)))
  encoded = lora.apply({"params": moved}, tokens, method="encode")
  assert not np.allclose(encoded, model.apply({"params": params}, tokens, method="encode"))
  np.testing.assert_allclose(
      lora.apply({"params": moved}, encoded, tokens, method="decoder_logits"),
      lora.apply({"params": moved}, tokens, tokens), atol=1e-5)


def test_scanned_layers_take_the_same_adapters(tmp_path):
  ref = _bert(str(tmp_path / "base"))
  inputs = _inputs()
  theirs = get_peft_model(ref, PeftConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                          target_modules=["query", "value", "output.dense"]))
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if "lora_B" in name:
        p.add_(0.1 * torch.randn_like(p))
  theirs.save_pretrained(str(tmp_path / "theirs"))
  want = _torch(theirs.eval(), "bert", *inputs)
  model, params = hf.load(str(tmp_path / "base"), scan_layers=True)
  lora, lora_params = peft.load_adapter(model, params, str(tmp_path / "theirs"))
  assert lora_params["encoder"]["layers"]["attn"]["query_kernel_lora_a"].shape == (2, 32, 4)
  _close(_ours(lora, lora_params, "bert", *inputs), want, inputs[1], "bert", 1e-5)
  peft.save_adapter(lora, lora_params, str(tmp_path / "again"))  # unscanned on the way out
  again = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(
      str(tmp_path / "base")), str(tmp_path / "again")).eval()
  _close(_torch(again, "bert", *inputs), want, inputs[1], "bert", 1e-5)


def test_bad_lora_settings_are_named(tmp_path):
  model = models.Bert(models.BertConfig.from_size("tiny"))
  with pytest.raises(ValueError, match=r"LoRA rank=0 must be an int > 0"):
    peft.LoraConfig(rank=0)
  with pytest.raises(ValueError, match=r"LoRA dropout=1.5"):
    peft.LoraConfig(dropout=1.5)
  lora = peft.wrap(model, peft.LoraConfig(targets=r".*/attn/nothing"))
  params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
  with pytest.raises(ValueError, match=r"match no projection; the model's are .*attn/query"):
    peft.add_adapters(lora, params, (jnp.ones((1, 4), jnp.int32),))
  with pytest.raises(ValueError, match="no adapter_config.json"):
    peft.load_adapter(model, params, str(tmp_path))
