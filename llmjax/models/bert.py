"""Encoder-only Transformer (BERT family): post-LN blocks, token types, MLM head, pooler."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import layers
from llmjax import sharding as sh
from llmjax.models import common, heads

SIZES = {
    "tiny": dict(vocab_size=256, max_seq_len=256, d_model=64, num_layers=2, num_heads=4, d_ff=256),
    "base": dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "large": dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
}


@dataclasses.dataclass(frozen=True)
class BertConfig(common.BaseConfig):
  """Hyperparameters of a BERT model; defaults are BERT-base (uncased vocabulary)."""

  vocab_size: int = 30522
  max_seq_len: int = 512
  type_vocab_size: int = 2
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: int | None = None
  head_dim: int | None = None
  d_ff: int = 3072
  activation: str = "gelu"
  norm_eps: float = 1e-12
  # mlm: logits over the vocabulary | none: final hidden states | classify: [B, num_labels]
  head: str = "mlm"
  pooler: bool = False  # tanh(dense(h[CLS])), returned by `Bert.pooled`
  num_labels: int = 0  # head="classify" only: its outputs (1: regression)
  SIZES = SIZES

  def __post_init__(self):
    super().__post_init__()
    common.check(self.head in ("mlm", "none", "classify"),
                 f"BertConfig.head={self.head!r}; expected mlm, none or classify")
    common.check_classifier(self)
    common.check(self.type_vocab_size > 0, "BertConfig.type_vocab_size must be positive")


class BertBlock(nn.Module):
  """x = LN(x + attn(x)), then x = LN(x + mlp(x)) (post-LN)."""

  cfg: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT):
    cfg = self.cfg
    x_BTD = sh.constrain(x_BTD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    h_BTD = layers.Attention(cfg.num_heads, cfg.kv_heads, cfg.k, dropout_rate=cfg.dropout_rate,
                             deterministic=self.deterministic, impl=cfg.attention_impl,
                             name="attn", **cfg.dtypes)(x_BTD, q_segment_ids=segment_ids_BT)
    h_BTD = layers.Dropout(cfg.dropout_rate)(h_BTD, deterministic=self.deterministic)
    x_BTD = layers.LayerNorm(cfg.norm_eps, name="attn_ln", **cfg.dtypes)(x_BTD + h_BTD)
    h_BTD = layers.Mlp(cfg.mlp_dim, cfg.activation, name="mlp", **cfg.dtypes)(x_BTD)
    h_BTD = layers.Dropout(cfg.dropout_rate)(h_BTD, deterministic=self.deterministic)
    x_BTD = layers.LayerNorm(cfg.norm_eps, name="mlp_ln", **cfg.dtypes)(x_BTD + h_BTD)
    return sh.constrain(x_BTD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), None


class Bert(nn.Module):
  """Bidirectional encoder: tokens [B, T] -> MLM logits [B, T, V] (float32), hidden [B, T, D]
  or classification logits [B, num_labels] (float32), by `cfg.head`.
  `segment_ids` [B, T]: 0 marks padding, equal non-zero ids mark one packed sequence;
  `token_types` [B, T]: BERT's sentence A/B ids (default 0); `positions` default to each
  token's index within its segment."""

  ARCHITECTURE = "encoder"  # which objectives train it: see objectives.Objective.check_model

  cfg: BertConfig

  def setup(self):
    cfg = self.cfg
    self.token_embed = layers.Embed(cfg.vocab_size, cfg.d_model, **cfg.dtypes)
    self.position_embed = layers.LearnedPositions(cfg.max_seq_len, cfg.d_model, **cfg.dtypes)
    self.type_embed = layers.Embed(cfg.type_vocab_size, cfg.d_model,
                                   axes=(sh.TOKEN_TYPES, sh.EMBED), **cfg.dtypes)
    self.embed_ln = layers.LayerNorm(cfg.norm_eps, **cfg.dtypes)
    self.embed_dropout = layers.Dropout(cfg.dropout_rate)
    self.encoder = _Encoder(cfg)
    # The D -> D denses keep their output unsplit: with it split over "tensor" on D, XLA's
    # SPMD partitioner (jax 0.10) computes wrong gradients through the tied un-embedding.
    dense = lambda: layers.mlp.dense(cfg.d_model, (sh.EMBED, None),
                                     nn.initializers.normal(0.02), **cfg.dtypes)
    if cfg.head == "mlm":
      self.mlm_dense = dense()
      self.mlm_ln = layers.LayerNorm(cfg.norm_eps, **cfg.dtypes)
      self.mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, (sh.VOCAB,)), (cfg.vocab_size,), cfg.weight_dtype)
    if cfg.pooler:
      self.pooler_dense = dense()
    if cfg.head == "classify":
      self.classifier = heads.ClassifierHead(cfg.num_labels, dropout_rate=cfg.dropout_rate,
                                             **cfg.dtypes)

  def hidden(self, tokens, segment_ids=None, token_types=None, positions=None, *,
             deterministic: bool = True) -> jax.Array:
    """Final hidden states [B, T, D] of the encoder."""
    cfg = self.cfg
    common.check_inputs("Bert", tokens, segment_ids=segment_ids, token_types=token_types,
                        positions=positions)
    T = tokens.shape[1]
    common.check(T <= cfg.max_seq_len, f"Bert: sequence length {T} exceeds "
                 f"BertConfig.max_seq_len={cfg.max_seq_len} (the learned position table)")
    segment_ids_BT = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    positions = layers.segment_positions(segment_ids_BT) if positions is None else positions
    token_types = jnp.zeros_like(tokens) if token_types is None else token_types
    x_BTD = (self.token_embed(tokens) + self.position_embed(positions)
             + self.type_embed(token_types))
    x_BTD = self.embed_dropout(self.embed_ln(x_BTD), deterministic=deterministic)
    return self.encoder(x_BTD, segment_ids_BT, deterministic)

  def pooled(self, hidden_BTD: jax.Array, pool_positions=None) -> jax.Array:
    """BERT's pooler: tanh(dense(hidden of the first token)), [B, D]; or of the tokens at
    `pool_positions` [B, P] (packed examples' [CLS]), [B, P, D]."""
    common.check(self.cfg.pooler, "Bert.pooled needs BertConfig.pooler=True")
    first = hidden_BTD[:, 0] if pool_positions is None else heads.pick(hidden_BTD, pool_positions)
    return jnp.tanh(self.pooler_dense(first))

  def __call__(self, tokens, segment_ids=None, token_types=None, positions=None, *,
               pool_positions=None, deterministic: bool = True) -> jax.Array:
    h_BTD = self.hidden(tokens, segment_ids, token_types, positions, deterministic=deterministic)
    if self.cfg.pooler and self.is_initializing():
      self.pooled(h_BTD)  # create the pooler's parameters
    if self.cfg.head == "none":
      return h_BTD
    if self.cfg.head == "classify":
      return self.classifier(self.pooled(h_BTD, pool_positions), deterministic)
    act = layers.mlp.activation(self.cfg.activation)
    h_BTD = self.mlm_ln(act(self.mlm_dense(h_BTD)))
    h_BTD = sh.constrain(h_BTD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    logits_BTV = self.token_embed.attend(h_BTD) + self.mlm_bias.astype(jnp.float32)
    return sh.constrain(logits_BTV, (sh.BATCH, sh.LENGTH, sh.VOCAB))


class _Encoder(nn.Module):
  """The stack of BertBlocks (its own module so layer params sit under `encoder/`)."""

  cfg: BertConfig

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, deterministic):
    return common.run_layers(BertBlock, self.cfg, self.cfg.num_layers, x_BTD, segment_ids_BT,
                             deterministic=deterministic)
