"""Trains a SentencePiece tokenizer (unigram or BPE, byte fallback) on text or JSONL files.

    python tools/train_tokenizer.py --input='data/*.txt' --model_prefix=tok/spm32k \
        --vocab_size=32000 --model_type=unigram --num_sentinels=100 --bert_specials

Ids 0-3 are pad, eos, bos, unk; `--bert_specials` adds [MASK] [CLS] [SEP], `--num_sentinels=N`
adds T5's `<extra_id_0>`...`<extra_id_{N-1}>`. Writes PREFIX.model and PREFIX.vocab; load it
with `llmjax.data.load_tokenizer("PREFIX.model")`.
"""

from absl import app, flags

from llmjax import paths
from llmjax.data.progress import Progress
from llmjax.data.sources import SPLITS, open_source
from llmjax.data.tokenizers import train_sentencepiece

flags.DEFINE_string("input", None, "Files, globs (comma-separated; local or gs://) or 'builtin'.",
                    required=True)
flags.DEFINE_enum("format", None, ["text", "jsonl"], "Default: from the extension.")
flags.DEFINE_enum("split", "line", SPLITS, "Text files: a document per line, paragraph or file.")
flags.DEFINE_string("field", "text", "JSONL: the field holding the text.")
flags.DEFINE_string("model_prefix", None, "Output path without extension (local or gs://).",
                    required=True)
flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size, specials included.")
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece algorithm.")
flags.DEFINE_integer("num_sentinels", 0, "T5 sentinels <extra_id_k> to reserve.")
flags.DEFINE_bool("bert_specials", False, "Reserve [MASK], [CLS] and [SEP].")
flags.DEFINE_bool("byte_fallback", True, "Unknown characters become UTF-8 byte pieces.")
flags.DEFINE_float("character_coverage", 0.9995, "Share of characters covered by pieces.")
flags.DEFINE_integer("max_documents", None, "Read at most this many documents.")
FLAGS = flags.FLAGS


def lines(source, max_documents=None):
  """The non-blank lines of the source's documents (SentencePiece's unit), with progress shown."""
  n = len(source) if max_documents is None else min(max_documents, len(source))
  progress = Progress("reading", total=n)
  for i in range(n):
    document = source[i]
    progress.update(1, nbytes=len(document.encode("utf-8")))
    yield from (line for line in document.split("\n") if line.strip())
  progress.close()


def main(argv):
  del argv
  try:
    paths.check_bucket(FLAGS.model_prefix)  # before the corpus is read
    source = open_source(FLAGS.input, format=FLAGS.format, split=FLAGS.split, field=FLAGS.field)
    if getattr(source, "tokenizer", None):
      raise ValueError(f"{FLAGS.input} holds token ids, not text; train on the original text")
    tokenizer = train_sentencepiece(
        lines(source, FLAGS.max_documents), FLAGS.model_prefix, vocab_size=FLAGS.vocab_size,
        model_type=FLAGS.model_type, num_sentinels=FLAGS.num_sentinels,
        bert_specials=FLAGS.bert_specials, byte_fallback=FLAGS.byte_fallback,
        character_coverage=FLAGS.character_coverage)
  except (OSError, ValueError, RuntimeError) as e:
    raise SystemExit(f"train_tokenizer: {e}") from None
  print(f"wrote {FLAGS.model_prefix}.model: {tokenizer.vocab_size} pieces, "
        f"{len(tokenizer.sentinel_ids)} sentinels, mask id {tokenizer.mask_id}")


if __name__ == "__main__":
  app.run(main)
