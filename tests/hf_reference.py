"""Random Hugging Face reference models for checkpoint-conversion tests.

Each ``make_*`` builder deterministically constructs a small, randomly
initialised ``transformers`` model (no hub access), perturbs *every*
parameter with seeded noise (so biases, norm weights and relative-attention
biases are all non-default and a converter that drops one is caught), saves
it with ``save_pretrained(path, safe_serialization=True)`` and returns a
``ref_fn`` that maps numpy inputs to float32 numpy reference outputs.

Every builder also reloads the saved directory with ``from_pretrained`` and
checks it reproduces the in-memory model, so the files on disk and the
reference outputs are guaranteed to agree.

Notes on transformers 5.x behaviour handled here:

* ``T5Config`` always forces ``tie_word_embeddings=True``; passing
  ``tie_word_embeddings=False`` only sets ``scale_decoder_outputs=False``
  (the ``d_model**-0.5`` scaling before the head).  The T5 v1.1 builder
  therefore gives ``lm_head`` its own ``nn.Parameter``; ``save_pretrained``
  then writes a distinct ``lm_head.weight`` and ``from_pretrained`` declines
  to re-tie it because both tensors are present with different values.
* ``make_t5(..., legacy_config=True)`` rewrites config.json the way hub
  checkpoints store it (``tie_word_embeddings`` false for v1.1, no
  ``scale_decoder_outputs`` key) to exercise converters on that layout.
* Attention is forced to the ``"eager"`` implementation (not saved to disk).
* Each returned ``ref_fn`` has a ``.model`` attribute (the in-memory torch
  model).  Attention *key* biases (BERT ``key.bias``) cannot affect outputs
  (softmax shift invariance), so no test can catch a converter dropping them.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 301
MAX_POS = 64

# Noise standard deviations added on top of the default HF initialisation.
_BIAS_STD = 0.1  # every bias vector (attention, MLP, LayerNorm, MLM head)
_NORM_STD = 0.1  # LayerNorm / T5LayerNorm scale vectors (default ones)
_EMBED_STD = 0.2  # token / position / token-type embedding tables
_REL_BIAS_STD = 0.5  # T5 relative attention bias tables [buckets, heads]
_MATRIX_GAIN = 0.5  # dense weights get N(0, (gain / sqrt(fan_in))**2)


def _noise_std(model: torch.nn.Module, name: str, param: torch.Tensor) -> float:
    """Return the noise std to add to parameter ``name``."""
    if "relative_attention_bias" in name:
        return _REL_BIAS_STD
    if param.ndim == 1:
        return _BIAS_STD if name.endswith("bias") else _NORM_STD
    module = model.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(module, torch.nn.Embedding):
        return _EMBED_STD
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    fan_in = param.shape[1] if isinstance(module, torch.nn.Linear) else param.shape[0]
    return _MATRIX_GAIN / float(fan_in) ** 0.5


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Add seeded Gaussian noise to every (deduplicated) parameter in place."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = _noise_std(model, name, param)
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def _build(model_cls, config, seed: int, customize=None) -> torch.nn.Module:
    """Construct ``model_cls(config)`` deterministically, perturb it, return eval fp32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    gen = torch.Generator().manual_seed(seed + 1)
    if customize is not None:
        customize(model, gen)
    _perturb(model, gen)
    return model.float().eval()


def _safetensors_keys(path: str) -> set[str]:
    """Return the tensor names stored in ``path/model.safetensors``."""
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _check_reload(model, path: str, factory: Callable, example: tuple) -> None:
    """Assert ``from_pretrained(path)`` reproduces ``factory(model)(*example)``."""
    reloaded = type(model).from_pretrained(path, attn_implementation="eager").float().eval()
    want, got = factory(model)(*example), factory(reloaded)(*example)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"reload mismatch for {path}")


def _save(model, path: str) -> None:
    """Write ``model`` to ``path`` as config.json + model.safetensors."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)


def _long(x: np.ndarray) -> torch.Tensor:
    """Convert an integer/0-1 numpy array to a torch int64 tensor."""
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


def _np(x: torch.Tensor) -> np.ndarray:
    """Convert a torch tensor to a float32 numpy array."""
    return x.detach().to(torch.float32).cpu().numpy()


def _reference(model, forward: Callable) -> Callable:
    """``ref_fn(*numpy int arrays)``: ``forward`` on long tensors, no grad, float32 numpy out.

    A tuple of outputs comes back as a tuple of arrays; ``ref_fn.model`` is ``model``.
    """

    def ref_fn(*arrays):
        with torch.no_grad():
            out = forward(*(_long(a) for a in arrays))
        return tuple(_np(o) for o in out) if isinstance(out, tuple) else _np(out)

    ref_fn.model = model
    return ref_fn


def _gpt2_ref(model):
    """``ref_fn(tokens, mask) -> logits [B,T,V]`` with explicit position_ids = arange(T)."""

    def forward(tokens, mask):
        pos = torch.arange(tokens.shape[1], dtype=torch.long)[None].expand_as(tokens)
        return model(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=False).logits

    return _reference(model, forward)


def _bert_mlm_ref(model):
    """``ref_fn(tokens, mask, token_types) -> logits [B,T,V]`` for BertForMaskedLM."""
    return _reference(model, lambda tokens, mask, types: model(
        input_ids=tokens, attention_mask=mask, token_type_ids=types).logits)


def _bert_model_ref(model):
    """``ref_fn(tokens, mask, token_types) -> (last_hidden_state, pooler_output)``."""

    def forward(tokens, mask, types):
        out = model(input_ids=tokens, attention_mask=mask, token_type_ids=types)
        return out.last_hidden_state, out.pooler_output

    return _reference(model, forward)


def _t5_ref(model):
    """``ref_fn(enc_tokens, enc_mask, dec_tokens, dec_mask) -> logits [B,Td,V]``."""
    return _reference(model, lambda enc, enc_mask, dec, dec_mask: model(
        input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec,
        decoder_attention_mask=dec_mask, use_cache=False).logits)


def _example_inputs(seed: int, n_text: int) -> tuple:
    """Return a small fixed right-padded batch (tokens, mask[, ...]) for round-trip checks."""
    rng = np.random.default_rng(seed)
    b, t = 2, 7
    out = []
    for _ in range(n_text):
        tokens = rng.integers(0, VOCAB, size=(b, t))
        mask = np.ones((b, t), dtype=np.int64)
        mask[1, 4:] = 0
        out += [tokens, mask]
    return tuple(out)


def make_gpt2(path: str, seed: int = 0) -> Callable:
    """Build, save and return ``ref_fn(tokens, mask) -> logits`` for a tiny random GPT-2."""
    config = GPT2Config(
        n_layer=3,
        n_head=4,
        n_embd=64,
        n_positions=MAX_POS,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        activation_function="gelu_new",
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        attn_implementation="eager",
    )
    model = _build(GPT2LMHeadModel, config, seed)
    _save(model, path)
    _check_reload(model, path, _gpt2_ref, _example_inputs(seed, 1))
    return _gpt2_ref(model)


def _bert_config() -> BertConfig:
    """Return the tiny BERT config shared by both BERT builders."""
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=MAX_POS,
        type_vocab_size=2,
        attn_implementation="eager",
    )


def _bert_example(seed: int) -> tuple:
    """Return (tokens, mask, token_types) for BERT round-trip checks."""
    tokens, mask = _example_inputs(seed, 1)
    token_types = np.zeros_like(tokens)
    token_types[:, 3:] = 1
    return tokens, mask, token_types * mask


def make_bert_mlm(path: str, seed: int = 0) -> Callable:
    """Build, save and return ``ref_fn(tokens, mask, token_types) -> logits`` for BertForMaskedLM."""
    model = _build(BertForMaskedLM, _bert_config(), seed)
    _save(model, path)
    _check_reload(model, path, _bert_mlm_ref, _bert_example(seed))
    return _bert_mlm_ref(model)


def make_bert_model(path: str, seed: int = 0) -> Callable:
    """Build, save and return ``ref_fn(tokens, mask, token_types) -> (hidden, pooled)`` for BertModel."""
    model = _build(BertModel, _bert_config(), seed)
    _save(model, path)
    _check_reload(model, path, _bert_model_ref, _bert_example(seed))
    return _bert_model_ref(model)


def _untie_lm_head(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give a T5 model an lm_head with its own random weights (not shared)."""
    d_model = model.config.d_model
    weight = torch.randn(model.shared.weight.shape, generator=gen) * (2.0 * d_model**-0.5)
    model.lm_head.weight = torch.nn.Parameter(weight)


def make_t5(path: str, version: str, seed: int = 0, legacy_config: bool = False) -> Callable:
    """Build, save and return ``ref_fn(enc, enc_mask, dec, dec_mask) -> logits`` for a tiny T5.

    ``version`` is ``"1.0"`` (relu FFN, tied head, ``d_model**-0.5`` output
    scaling) or ``"1.1"`` (gated-gelu FFN, untied head, no scaling).  With
    ``legacy_config=True`` config.json is rewritten the way hub checkpoints
    store it (no ``scale_decoder_outputs``; ``tie_word_embeddings`` false for
    1.1) and the reload check is repeated against that file.
    """
    if version not in ("1.0", "1.1"):
        raise ValueError(f"unknown T5 version {version!r}")
    v11 = version == "1.1"
    config = T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        num_heads=4,
        d_ff=128,
        num_layers=3,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if v11 else "relu",
        tie_word_embeddings=not v11,
        attn_implementation="eager",
    )
    assert config.scale_decoder_outputs == (not v11)
    model = _build(T5ForConditionalGeneration, config, seed, _untie_lm_head if v11 else None)
    assert (model.lm_head.weight is model.shared.weight) == (not v11)
    _save(model, path)
    if legacy_config:
        cfg_path = os.path.join(path, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.pop("scale_decoder_outputs", None)
        cfg["tie_word_embeddings"] = not v11
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    _check_reload(model, path, _t5_ref, _example_inputs(seed, 2))
    keys = _safetensors_keys(path)
    assert ("lm_head.weight" in keys) == v11, sorted(keys)
    if v11:
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            assert not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("shared.weight"))
    return _t5_ref(model)
