"""Tokenizes a corpus once into ArrayRecord shards (plus meta.json) for fast random access.

    python tools/tokenize_corpus.py --input='data/*.txt' --split=paragraph \
        --tokenizer=spm.model --output_dir=shards/ --num_shards=16

Read the result with `llmjax.data.ArrayRecordSource("shards/")` (or give the directory as a
pipeline's data path); the pipeline checks that it uses the same tokenizer.
"""

from absl import app, flags

from llmjax.data import load_tokenizer
from llmjax.data.shards import check_output_dir, write_shards
from llmjax.data.sources import SPLITS, open_source

flags.DEFINE_string("input", None, "Files, globs (comma-separated; local or gs://) or 'builtin'.",
                    required=True)
flags.DEFINE_enum("format", None, ["text", "jsonl", "array_record"], "Default: from the extension.")
flags.DEFINE_enum("split", "line", SPLITS, "Text files: a document per line, paragraph or file.")
flags.DEFINE_string("field", "text", "JSONL: the field holding the text.")
flags.DEFINE_string("tokenizer", "byte", "'byte', 'byte:N' or a tokenizer path (local or gs://).")
flags.DEFINE_string("output_dir", None, "An empty or new local directory for the shards.",
                    required=True)
flags.DEFINE_integer("num_shards", 8, "Number of shards.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    check_output_dir(FLAGS.output_dir)  # before the corpus is read
    source = open_source(FLAGS.input, format=FLAGS.format, split=FLAGS.split, field=FLAGS.field)
    meta = write_shards(source, load_tokenizer(FLAGS.tokenizer), FLAGS.output_dir,
                        num_shards=FLAGS.num_shards)
  except (OSError, ValueError) as e:
    raise SystemExit(f"tokenize_corpus: {e}") from None
  print(f"wrote {meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta['dtype']}) "
        f"into {len(meta['shards'])} shards in {FLAGS.output_dir}")


if __name__ == "__main__":
  app.run(main)
