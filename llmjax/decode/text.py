"""Text in, text out: a decoder-only model's continuation of a prompt, of any length."""

from __future__ import annotations

import jax

from llmjax.decode.generation import generate


def sample_text(model, params, tokenizer, prompt: str, num_tokens: int, *,
                temperature: float = 0.8, seed: int = 0) -> str:
  """`prompt` and up to `num_tokens` tokens of the GPT's continuation (to its EOS), as text.
  The prompt is [BOS] (if any) + tokenizer.encode(prompt); a continuation past the model's
  positions goes on in rounds, each prompted with the last half window so far."""
  text = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  text += [int(t) for t in tokenizer.encode(prompt)]
  start, window, key = len(text), model.cfg.max_seq_len, jax.random.key(seed)
  while len(text) - start < num_tokens:
    context = text[-(window // 2):] if len(text) >= window else text
    count = min(num_tokens - (len(text) - start), window - len(context))
    new = generate(model, params, [context], count, temperature=temperature,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0,
                   rng=jax.random.fold_in(key, len(text)))[0].tolist()
    if tokenizer.eos_id in new:
      text += new[:new.index(tokenizer.eos_id)]
      break
    text += new
  return prompt + tokenizer.decode(text[start:])
