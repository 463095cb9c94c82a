"""`mistral-lightning preprocess`: tokenize parquet/jsonl/json rows into Megatron indexed datasets.

One job per module, each importing only those above it:
  config    PreprocessConfig (the options) and PreprocessError
  chunks    RowSkip, ChunkOrigin, RowChunk, EncodedChunk: what flows from readers to the writers
  handlers  turn rows into token sequences (pretraining text, Alpaca, Mistral chat)
  readers   expand --input into files and read each in chunks that carry their origin
  summary   PreprocessSummary: counts, skip examples and the printed report
  progress  the one-line progress report on stderr
  pipeline  preprocess(): the worker pool and the writers
  cli       the argparse parser and main(argv)
"""
