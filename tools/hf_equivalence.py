"""Prints max |output difference| between llmjax and transformers on random checkpoints.

    python tools/hf_equivalence.py      # needs the test extra (torch CPU + transformers)

Builds the random Hugging Face models of tests/hf_test.py (which asserts <= 1e-4), loads
each with llmjax.hf.load and reports the float32 difference on real (non-padding) positions.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llmjax import hf  # noqa: E402
from tests import hf_reference  # noqa: E402
from tests.hf_test import _batch  # noqa: E402


def _max_diff(ours, ref, mask):
  return np.abs(np.asarray(ours)[mask > 0] - ref[mask > 0]).max()


def main():
  tokens, mask = _batch(0)
  types = np.zeros_like(tokens)
  enc, emask = _batch(3, T=14)
  dec, dmask = _batch(4, T=9)
  j = jnp.asarray
  with tempfile.TemporaryDirectory() as d:
    ref = hf_reference.make_gpt2(f"{d}/gpt2")
    model, params = hf.load(f"{d}/gpt2")
    out = model.apply({"params": params}, j(tokens), segment_ids=j(mask))
    print(f"GPT2LMHeadModel logits      {_max_diff(out, ref(tokens, mask), mask):.2e}")
    for name, make in (("BertForMaskedLM logits     ", hf_reference.make_bert_mlm),
                       ("BertModel hidden states    ", hf_reference.make_bert_model)):
      ref = make(f"{d}/{name.split()[0]}")
      model, params = hf.load(f"{d}/{name.split()[0]}")
      out = model.apply({"params": params}, j(tokens), segment_ids=j(mask), token_types=j(types))
      want = ref(tokens, mask, types)
      want = want[0] if isinstance(want, tuple) else want
      print(f"{name} {_max_diff(out, want, mask):.2e}")
    for version in ("1.0", "1.1"):
      ref = hf_reference.make_t5(f"{d}/t5_{version}", version)
      model, params = hf.load(f"{d}/t5_{version}")
      out = model.apply({"params": params}, j(enc), j(dec), encoder_segment_ids=j(emask),
                        decoder_segment_ids=j(dmask))
      print(f"T5 v{version} logits              "
            f"{_max_diff(out, ref(enc, emask, dec, dmask), dmask):.2e}")


if __name__ == "__main__":
  main()
