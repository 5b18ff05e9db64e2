"""Hugging Face checkpoints (config.json + safetensors) -> llmjax models and parameters.

Supported architectures: GPT2LMHeadModel (and GPT2Model), BertForMaskedLM, BertModel
(returns final hidden states; the pooler, if present, is `model.apply(..., method="pooled")`),
BertForSequenceClassification and GPT2ForSequenceClassification (logits [B, num_labels]) and
T5ForConditionalGeneration v1.0 and v1.1. Reading needs safetensors and numpy, never torch;
every tensor the conversion expects is checked for presence and shape, and errors name it.
"""

import json
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import linen as nn

from llmjax import models, paths

SUPPORTED = ("GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification", "BertForMaskedLM",
             "BertModel", "BertForSequenceClassification", "T5ForConditionalGeneration")
# Tensors a checkpoint may carry that hold no weights (causal-mask buffers, position ids).
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|position_ids|token_type_ids|"
                      r"EncDecAttention\.relative_attention_bias\.weight)$")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """config.json as a dict and every tensor of model.safetensors (or its sharded index)."""
  paths.check_bucket(str(path))  # gs://: one line in seconds for an unreachable bucket
  root = epath.Path(path)
  if not (root / "config.json").is_file():
    raise ValueError(f"{path!r} is not a Hugging Face checkpoint directory: no config.json")
  config = json.loads((root / "config.json").read_text())
  single, index = root / "model.safetensors", root / "model.safetensors.index.json"
  if single.is_file():
    files = [single]
  elif index.is_file():
    files = [root / v for v in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
  else:
    raise ValueError(f"{path!r} has no model.safetensors (nor model.safetensors.index.json); "
                     f"save the model with save_pretrained(..., safe_serialization=True)")
  tensors = {}
  for file in files:
    tensors.update(safetensors.numpy.load(file.read_bytes()) if paths.is_url(file) else
                   safetensors.numpy.load_file(str(file)))
  return config, tensors


def architecture(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> str:
  """The checkpoint's architecture name, from config.json (or its model_type)."""
  arch = (config.get("architectures") or [None])[0]
  if arch is None:  # older configs: infer from model_type and the tensors present
    arch = {"gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration",
            "bert": "BertForMaskedLM" if any(k.startswith("cls.predictions") for k in tensors)
            else "BertModel"}.get(config.get("model_type"), config.get("model_type"))
  if arch not in SUPPORTED:
    raise ValueError(f"unsupported checkpoint architecture {arch!r}; llmjax reads "
                     f"{', '.join(SUPPORTED)}")
  return arch


class _Tensors:
  """Name -> array lookup with optional key prefixes, shape checks and use tracking."""

  def __init__(self, tensors: dict[str, np.ndarray], prefixes: tuple[str, ...], path: str):
    self.tensors, self.prefixes, self.path, self.used = tensors, prefixes, path, set()

  def find(self, name: str) -> str | None:
    """The key of `name` under the first prefix that has it (TF-era BERT names too), or None."""
    tf_name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                         "LayerNorm.beta")
    keys = (prefix + alias for alias in (name, tf_name) for prefix in self.prefixes)
    return next((key for key in keys if key in self.tensors), None)

  def has(self, name: str) -> bool:
    return self.find(name) is not None

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = self.find(name)
    if key is None:
      raise ValueError(f"checkpoint {self.path!r} is missing tensor {self.prefixes[0] + name!r}")
    value = self.tensors[key]
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"checkpoint {self.path!r}: tensor {key!r} has shape {tuple(value.shape)}, "
                       f"but the config implies {tuple(shape)}")
    self.used.add(key)
    return value

  def linear(self, name: str, d_in: int, out_shape: tuple[int, ...]) -> np.ndarray:
    """A torch nn.Linear weight [out, in] as a kernel [in, *out_shape]."""
    return self(name, (int(np.prod(out_shape)), d_in)).T.reshape(d_in, *out_shape)

  def unused(self) -> list[str]:
    return sorted(k for k in self.tensors if k not in self.used and not _IGNORED.search(k))


# Config fields a caller may override on load: how the model runs, never what it computes.
OVERRIDABLE = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
               "dropout_rate")
# Heads a checkpoint may carry that the llmjax model has no place for, by design.
_UNUSED_HEADS = re.compile(r"^cls\.seq_relationship\.")


def _activation(config: dict[str, Any], key: str, default: str) -> str:
  name = config.get(key, default)
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported activation {key}={name!r} in config.json; llmjax maps "
                     f"{sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _reject(config: dict[str, Any], family: str, **expected) -> None:
  """Raises for a config option that would change the math away from what llmjax computes."""
  for key, ok in expected.items():
    if config.get(key, ok) != ok:
      raise ValueError(f"unsupported {family} option {key}={config[key]!r}; llmjax reads {ok!r}")


def _config(cls, derived: dict[str, Any], overrides: dict[str, Any]):
  bad = sorted(set(overrides) - set(OVERRIDABLE))
  if bad:
    raise ValueError(f"cannot override {bad} when loading a checkpoint (they are fixed by its "
                     f"weights or math); overridable fields: {list(OVERRIDABLE)}")
  return cls(**{**derived, **overrides})


def _classify(config: dict[str, Any], arch: str) -> dict[str, Any]:
  """The head fields of a *ForSequenceClassification checkpoint (num_labels from its labels)."""
  if not arch.endswith("ForSequenceClassification"):
    return {}
  return {"head": "classify", "num_labels": len(config.get("id2label") or {}) or
          config.get("num_labels", 2)}


def _gpt2(config, t: _Tensors, arch, overrides):
  # reorder_and_upcast_attn only changes precision; llmjax's attention logits are float32.
  _reject(config, "GPT-2", scale_attn_by_inverse_layer_idx=False, scale_attn_weights=True,
          add_cross_attention=False)
  D, H = config["n_embd"], config["n_head"]
  cfg = _config(models.GPTConfig, dict(
      vocab_size=config["vocab_size"], max_seq_len=config["n_positions"], d_model=D,
      num_layers=config["n_layer"], num_heads=H, d_ff=config.get("n_inner") or 4 * D,
      activation=_activation(config, "activation_function", "gelu_new"),
      norm_eps=config.get("layer_norm_epsilon", 1e-5), dropout_rate=config.get("resid_pdrop", 0.1),
      tie_embeddings=not _untied(t, "lm_head.weight", "wte.weight"),
      **_classify(config, arch)), overrides)
  K, F = cfg.k, cfg.mlp_dim
  ln = lambda n: {"scale": t(f"{n}.weight", (D,)), "bias": t(f"{n}.bias", (D,))}
  conv = lambda n, i, o: {"kernel": t(f"{n}.weight", (i, o)), "bias": t(f"{n}.bias", (o,))}
  params = {"wte": {"embedding": t("wte.weight", (cfg.vocab_size, D))},
            "wpe": {"embedding": t("wpe.weight", (cfg.max_seq_len, D))},
            "ln_f": ln("ln_f")}
  for i in range(cfg.num_layers):
    p = f"h.{i}"
    qkv_w = np.split(t(f"{p}.attn.c_attn.weight", (D, 3 * D)), 3, axis=1)
    qkv_b = np.split(t(f"{p}.attn.c_attn.bias", (3 * D,)), 3)
    attn = {}
    for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b):
      attn[f"{name}_kernel"], attn[f"{name}_bias"] = w.reshape(D, H, K), b.reshape(H, K)
    attn["out_kernel"] = t(f"{p}.attn.c_proj.weight", (D, D)).reshape(H, K, D)
    attn["out_bias"] = t(f"{p}.attn.c_proj.bias", (D,))
    params[f"layers_{i}"] = {"ln_1": ln(f"{p}.ln_1"), "attn": attn, "ln_2": ln(f"{p}.ln_2"),
                             "mlp": {"wi": conv(f"{p}.mlp.c_fc", D, F),
                                     "wo": conv(f"{p}.mlp.c_proj", F, D)}}
  if cfg.head == "classify":
    params["classifier"] = {"kernel": t.linear("score.weight", D, (cfg.num_labels,))}
  elif not cfg.tie_embeddings:
    params["head"] = t("lm_head.weight", (cfg.vocab_size, D)).T
  return cfg, params


def _untied(t: _Tensors, head: str, embedding: str) -> bool:
  """A head tensor that is present and differs from the embedding means an untied head."""
  key, emb = t.find(head), t.find(embedding)
  if key is None:
    return False
  if emb is not None and np.array_equal(t.tensors[key], t.tensors[emb]):
    t.used.add(key)
    return False
  return True


def _bert(config, t: _Tensors, arch, overrides):
  _reject(config, "BERT", position_embedding_type="absolute", is_decoder=False,
          add_cross_attention=False)
  D = config["hidden_size"]
  mlm = arch == "BertForMaskedLM"
  cfg = _config(models.BertConfig, dict(
      vocab_size=config["vocab_size"], max_seq_len=config["max_position_embeddings"],
      type_vocab_size=config.get("type_vocab_size", 2), d_model=D,
      num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
      d_ff=config["intermediate_size"], activation=_activation(config, "hidden_act", "gelu"),
      norm_eps=config.get("layer_norm_eps", 1e-12),
      dropout_rate=config.get("hidden_dropout_prob", 0.1), head="mlm" if mlm else "none",
      pooler=t.has("pooler.dense.weight")) | _classify(config, arch), overrides)
  H, K, F = cfg.num_heads, cfg.k, cfg.mlp_dim
  ln = lambda n: {"scale": t(f"{n}.weight", (D,)), "bias": t(f"{n}.bias", (D,))}
  dense = lambda n, i, o: {"kernel": t.linear(f"{n}.weight", i, (o,)), "bias": t(f"{n}.bias", (o,))}
  embed = lambda n, rows: {"embedding": t(f"embeddings.{n}_embeddings.weight", (rows, D))}
  params = {"token_embed": embed("word", cfg.vocab_size),
            "position_embed": embed("position", cfg.max_seq_len),
            "type_embed": embed("token_type", cfg.type_vocab_size),
            "embed_ln": ln("embeddings.LayerNorm"), "encoder": {}}
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}"
    attn = {}
    for name in ("query", "key", "value"):
      attn[f"{name}_kernel"] = t.linear(f"{p}.attention.self.{name}.weight", D, (H, K))
      attn[f"{name}_bias"] = t(f"{p}.attention.self.{name}.bias", (H * K,)).reshape(H, K)
    attn["out_kernel"] = t.linear(f"{p}.attention.output.dense.weight", H * K, (D,)).reshape(H, K, D)
    attn["out_bias"] = t(f"{p}.attention.output.dense.bias", (D,))
    params["encoder"][f"layers_{i}"] = {
        "attn": attn, "attn_ln": ln(f"{p}.attention.output.LayerNorm"),
        "mlp": {"wi": dense(f"{p}.intermediate.dense", D, F), "wo": dense(f"{p}.output.dense", F, D)},
        "mlp_ln": ln(f"{p}.output.LayerNorm")}
  if cfg.pooler:
    params["pooler_dense"] = dense("pooler.dense", D, D)
  if cfg.head == "classify":
    params["classifier"] = dense("classifier", D, cfg.num_labels)
  if mlm:
    if _untied(t, "cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"):
      raise ValueError("unsupported BERT checkpoint: cls.predictions.decoder.weight differs "
                       "from the word embeddings (llmjax's MLM head is tied)")
    params["mlm_dense"] = dense("cls.predictions.transform.dense", D, D)
    params["mlm_ln"] = ln("cls.predictions.transform.LayerNorm")
    bias = "cls.predictions.bias" if t.has("cls.predictions.bias") else "cls.predictions.decoder.bias"
    params["mlm_bias"] = t(bias, (cfg.vocab_size,))
    if t.has("cls.predictions.decoder.bias"):
      t("cls.predictions.decoder.bias", (cfg.vocab_size,))
  return cfg, params


def _t5(config, t: _Tensors, overrides):
  ff = config.get("feed_forward_proj", "relu")
  gated = ff.startswith("gated-")
  act_key = "dense_act_fn" if config.get("dense_act_fn") else "feed_forward_proj"
  act = config.get("dense_act_fn") or ff.removeprefix("gated-")
  act = "gelu_new" if (gated and act == "gelu") else act  # HF maps gated-gelu to gelu_new
  decoder_layers = config.get("num_decoder_layers")
  cfg = _config(models.T5Config, dict(
      vocab_size=config["vocab_size"], d_model=config["d_model"], num_layers=config["num_layers"],
      num_decoder_layers=config["num_layers"] if decoder_layers is None else decoder_layers,
      num_heads=config["num_heads"], head_dim=config["d_kv"], d_ff=config["d_ff"],
      activation=_activation({act_key: act}, act_key, act), gated=gated,
      tie_embeddings=not _untied(t, "lm_head.weight", "shared.weight"),
      scale_logits=config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True)),
      relative_buckets=config.get("relative_attention_num_buckets", 32),
      relative_max_distance=config.get("relative_attention_max_distance", 128),
      norm_eps=config.get("layer_norm_epsilon", 1e-6), dropout_rate=config.get("dropout_rate", 0.1)),
      overrides)
  D, H, K, F = cfg.d_model, cfg.num_heads, cfg.k, cfg.mlp_dim
  norm = lambda n: {"scale": t(f"{n}.weight", (D,))}

  def attention(p):
    out = {f"{name}_kernel": t.linear(f"{p}.{n}.weight", D, (H, K))
           for name, n in (("query", "q"), ("key", "k"), ("value", "v"))}
    out["out_kernel"] = t.linear(f"{p}.o.weight", H * K, (D,)).reshape(H, K, D)
    return out

  def mlp(p):
    wi = {n: {"kernel": t.linear(f"{p}.{n}.weight", D, (F,))}
          for n in (("wi_0", "wi_1") if gated else ("wi",))}
    return {**wi, "wo": {"kernel": t.linear(f"{p}.wo.weight", F, (D,))}}

  def stack(name, num_layers, is_decoder):
    rel = f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    out = {"relpos_bias": {"embedding": t(rel, (cfg.relative_buckets, H))},
           "final_norm": norm(f"{name}.final_layer_norm")}
    for i in range(num_layers):
      p = f"{name}.block.{i}.layer"
      ff = 2 if is_decoder else 1
      layer = {"self_attn_norm": norm(f"{p}.0.layer_norm"),
               "self_attn": attention(f"{p}.0.SelfAttention"),
               "mlp_norm": norm(f"{p}.{ff}.layer_norm"), "mlp": mlp(f"{p}.{ff}.DenseReluDense")}
      if is_decoder:
        layer["cross_attn_norm"] = norm(f"{p}.1.layer_norm")
        layer["cross_attn"] = attention(f"{p}.1.EncDecAttention")
      out[f"layers_{i}"] = layer
    return out

  params = {"token_embed": {"embedding": t("shared.weight", (cfg.vocab_size, D))},
            "encoder": stack("encoder", cfg.num_layers, False),
            "decoder": stack("decoder", cfg.decoder_layers, True)}
  for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    _untied(t, tied, "shared.weight")  # stored copies of the shared table are expected
  if not cfg.tie_embeddings:
    params["lm_head"] = t("lm_head.weight", (cfg.vocab_size, D)).T
  return cfg, params


def convert(config: dict[str, Any], tensors: dict[str, np.ndarray], path: str = "<memory>",
            **overrides) -> tuple[Any, dict]:
  """(llmjax config, numpy params) from a Hugging Face config dict and tensors; `overrides` replace
  the llmjax config fields named in OVERRIDABLE. A tensor the model has no place for is an error;
  task heads llmjax does not build (BERT's next-sentence head) are logged."""
  arch = architecture(config, tensors)
  if arch.startswith("GPT2"):
    t = _Tensors(tensors, ("transformer.", ""), path)
    cfg, params = _gpt2(config, t, arch, overrides)
  elif arch.startswith("Bert"):
    t = _Tensors(tensors, ("", "bert.") if arch == "BertModel" else ("bert.", ""), path)
    cfg, params = _bert(config, t, arch, overrides)
  else:
    t = _Tensors(tensors, ("",), path)
    cfg, params = _t5(config, t, overrides)
  unused = t.unused()
  heads = [k for k in unused if _UNUSED_HEADS.search(k)]
  if heads:
    logging.warning("checkpoint %r: not loading %s (a task head the llmjax %s model does not "
                    "have)", path, heads, arch)
  unknown = [k for k in unused if k not in heads]
  if unknown:
    raise ValueError(f"checkpoint {path!r} holds tensors the llmjax {arch} model has no place "
                     f"for: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
  if cfg.scan_layers:
    params = stack_all(params)
  return cfg, params


def stack_all(params: dict) -> dict:
  """Stacks every `layers_i` group in the tree into one scanned `layers` entry."""
  if not isinstance(params, dict):
    return params
  n = sum(1 for k in params if re.fullmatch(r"layers_\d+", k))
  params = {k: stack_all(v) for k, v in params.items()}
  return models.stack_layers(params, n) if n else params


def load(path: str, **overrides) -> tuple[nn.Module, dict]:
  """(model, params) for a Hugging Face checkpoint directory, local or gs://; `overrides` as in
  `convert` (e.g. dtype="bfloat16", scan_layers=True). Params are jax arrays in `param_dtype`."""
  config, tensors = read_checkpoint(path)
  cfg, params = convert(config, tensors, path, **overrides)
  params = jax.tree.map(lambda x: jnp.asarray(x, cfg.weight_dtype), params)
  _, model_cls = models.FAMILIES[models.config_to_dict(cfg)["family"]]
  return model_cls(cfg), params
