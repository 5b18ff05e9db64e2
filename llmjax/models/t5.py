"""Encoder-decoder Transformer (T5 v1.0 and v1.1): pre-RMSNorm blocks, relative position bias."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from llmjax import layers
from llmjax import sharding as sh
from llmjax.models import common

_V1_1 = dict(activation="gelu_tanh", gated=True, tie_embeddings=False, scale_logits=False)
SIZES = {
    "tiny": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, head_dim=16, d_ff=256),
    "small": dict(d_model=512, num_layers=6, num_heads=8, d_ff=2048),
    "base": dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "large": dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    "v1_1-tiny": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, head_dim=16,
                      d_ff=128, **_V1_1),
    "v1_1-small": dict(d_model=512, num_layers=8, num_heads=6, d_ff=1024, **_V1_1),
    "v1_1-base": dict(d_model=768, num_layers=12, num_heads=12, d_ff=2048, **_V1_1),
    "v1_1-large": dict(d_model=1024, num_layers=24, num_heads=16, d_ff=2816, **_V1_1),
}


@dataclasses.dataclass(frozen=True)
class T5Config(common.BaseConfig):
  """Hyperparameters of a T5 model; defaults are T5-small v1.0 (relu, tied scaled head)."""

  vocab_size: int = 32128
  d_model: int = 512
  num_layers: int = 6  # encoder layers
  num_decoder_layers: int | None = None  # None: as many as the encoder
  num_heads: int = 8
  num_kv_heads: int | None = None
  head_dim: int | None = 64  # T5's d_kv, independent of d_model // num_heads
  d_ff: int = 2048
  activation: str = "relu"
  gated: bool = False  # v1.1: gated-gelu
  tie_embeddings: bool = True  # the output head reuses the shared embedding
  scale_logits: bool = True  # multiply the decoder output by d_model**-0.5 before the head (v1.0)
  relative_buckets: int = 32
  relative_max_distance: int = 128
  norm_eps: float = 1e-6
  SIZES = SIZES

  def __post_init__(self):
    super().__post_init__()
    common.check(self.decoder_layers > 0, "T5Config.num_decoder_layers must be positive")
    common.check(self.relative_buckets >= 4 and self.relative_max_distance > 0,
                 f"T5Config.relative_buckets={self.relative_buckets} must be >= 4 and "
                 f"relative_max_distance={self.relative_max_distance} positive")

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers


def _attention(cfg: T5Config, deterministic: bool, name: str, **kw) -> layers.Attention:
  """T5 attention: no biases, no 1/sqrt(K) scaling (folded into the init instead)."""
  D, H, K = cfg.d_model, cfg.num_heads, cfg.k
  normal = nn.initializers.normal
  return layers.Attention(H, cfg.kv_heads, K, use_bias=False, scale=1.0,
                          dropout_rate=cfg.dropout_rate, deterministic=deterministic,
                          impl=cfg.attention_impl, q_init=normal((D * K) ** -0.5),
                          kv_init=normal(D ** -0.5), out_init=normal((H * K) ** -0.5),
                          name=name, **cfg.dtypes, **kw)


class T5Block(nn.Module):
  """x + attn(norm(x)) [+ cross-attn(norm(x), encoded)] + mlp(norm(x)), each with dropout."""

  cfg: T5Config
  deterministic: bool = True
  is_decoder: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, relative_bias, encoded_BSD=None, enc_segment_ids_BS=None):
    cfg, det = self.cfg, self.deterministic
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, name=name, **cfg.dtypes)
    drop = lambda h: layers.Dropout(cfg.dropout_rate)(h, deterministic=det)
    x_BTD = sh.constrain(x_BTD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    x_BTD = x_BTD + drop(_attention(cfg, det, "self_attn", decode=self.decode)(
        norm("self_attn_norm")(x_BTD), q_segment_ids=segment_ids_BT, causal=self.is_decoder,
        bias=relative_bias))
    if self.is_decoder:
      x_BTD = x_BTD + drop(_attention(cfg, det, "cross_attn", decode=self.decode, cross=True)(
          norm("cross_attn_norm")(x_BTD), encoded_BSD, q_segment_ids=segment_ids_BT,
          kv_segment_ids=enc_segment_ids_BS))
    normal = nn.initializers.normal
    mlp = layers.Mlp(cfg.mlp_dim, cfg.activation, cfg.gated, use_bias=False,
                     dropout_rate=cfg.dropout_rate, deterministic=det,
                     wi_init=normal(cfg.d_model ** -0.5), wo_init=normal(cfg.mlp_dim ** -0.5),
                     name="mlp", **cfg.dtypes)
    x_BTD = x_BTD + drop(mlp(norm("mlp_norm")(x_BTD)))
    return sh.constrain(x_BTD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), None


class T5Stack(nn.Module):
  """Encoder or decoder: relative bias (shared by all layers), blocks, final norm, dropout."""

  cfg: T5Config
  is_decoder: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, encoded_BSD=None, enc_segment_ids_BS=None, *,
               deterministic: bool = True):
    cfg = self.cfg
    T = x_BTD.shape[1]
    relative_bias = layers.RelativePositionBias(  # as a table: the attention applies it
        cfg.relative_buckets, cfg.relative_max_distance, cfg.num_heads, not self.is_decoder,
        cfg.weight_dtype, nn.initializers.normal(cfg.d_model ** -0.5), name="relpos_bias")(
            T, T, as_table=True)
    x_BTD = layers.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)
    args = (segment_ids_BT, relative_bias) + ((encoded_BSD, enc_segment_ids_BS)
                                          if self.is_decoder else ())
    num_layers = cfg.decoder_layers if self.is_decoder else cfg.num_layers
    x_BTD = common.run_layers(T5Block, cfg, num_layers, x_BTD, *args, deterministic=deterministic,
                              is_decoder=self.is_decoder, decode=self.decode)
    x_BTD = layers.RMSNorm(cfg.norm_eps, name="final_norm", **cfg.dtypes)(x_BTD)
    return layers.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)


class T5(nn.Module):
  """Encoder-decoder model: (encoder tokens [B, S], decoder tokens [B, T]) -> logits [B, T, V].
  Decoder tokens are the decoder's inputs (targets shifted right). Segment ids: 0 marks
  padding, equal non-zero ids one packed sequence, matched between encoder and decoder
  (decoder segment k attends to encoder segment k). Logits are float32.

  `decode=True` caches the decoder's self-attention keys and values and, projected once,
  the encoder output's: initialize with a [B, max_length] decoder input, then pass the
  encoder output to `decoder_logits` first and `encoded_BSD=None` after (llmjax.decode)."""

  ARCHITECTURE = "encoder_decoder"  # which objectives train it: see objectives.Objective.check_model

  cfg: T5Config
  decode: bool = False

  def setup(self):
    cfg = self.cfg
    self.token_embed = layers.Embed(cfg.vocab_size, cfg.d_model, embedding_init=
                                    nn.initializers.normal(1.0), **cfg.dtypes)
    self.encoder = T5Stack(cfg, is_decoder=False)
    self.decoder = T5Stack(cfg, is_decoder=True, decode=self.decode)
    if not cfg.tie_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.d_model ** -0.5), (sh.EMBED, sh.VOCAB)),
                                (cfg.d_model, cfg.vocab_size), cfg.weight_dtype)

  def encode(self, encoder_tokens, encoder_segment_ids=None, *, deterministic: bool = True):
    """Encoder output [B, S, D]."""
    common.check_inputs("T5 encoder", encoder_tokens, encoder_segment_ids=encoder_segment_ids)
    seg_BS = jnp.ones_like(encoder_tokens) if encoder_segment_ids is None else encoder_segment_ids
    return self.encoder(self.token_embed(encoder_tokens), seg_BS, deterministic=deterministic)

  def decoder_logits(self, encoded_BSD, decoder_tokens, encoder_segment_ids=None,
                     decoder_segment_ids=None, *, deterministic: bool = True):
    """Decoder logits [B, T, V] given the encoder output (None: decoding, from the cache)."""
    cfg = self.cfg
    common.check_inputs("T5 decoder", decoder_tokens, decoder_segment_ids=decoder_segment_ids)
    dec_seg_BT = (jnp.ones_like(decoder_tokens) if decoder_segment_ids is None
                  else decoder_segment_ids)
    # Encoder segment ids default to ones in the cross-attention, where the encoder output is.
    y_BTD = self.decoder(self.token_embed(decoder_tokens), dec_seg_BT, encoded_BSD,
                         encoder_segment_ids, deterministic=deterministic)
    if cfg.scale_logits:
      y_BTD = y_BTD * cfg.d_model ** -0.5
    if cfg.tie_embeddings:
      logits_BTV = self.token_embed.attend(y_BTD)
    else:
      logits_BTV = jnp.einsum("BTD,DV->BTV", y_BTD.astype(jnp.float32),
                              jnp.asarray(self.lm_head, jnp.float32))
    return sh.constrain(logits_BTV, (sh.BATCH, sh.LENGTH, sh.VOCAB))

  def __call__(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, *, deterministic: bool = True):
    encoded_BSD = self.encode(encoder_tokens, encoder_segment_ids, deterministic=deterministic)
    return self.decoder_logits(encoded_BSD, decoder_tokens, encoder_segment_ids,
                               decoder_segment_ids, deterministic=deterministic)
