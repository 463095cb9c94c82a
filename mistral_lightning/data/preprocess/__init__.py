"""`mistral-lightning preprocess`: tokenize parquet/jsonl/json/arrow rows into Megatron indexed datasets.

One job per module, each importing only those above it:
  config       PreprocessConfig (the options) and PreprocessError
  chunks       RowSkip, ChunkOrigin, RowChunk, EncodedChunk: what flows from readers to the writers
  columns      --columns: a dataset's column names mapped onto a format's
  preference   preference pairs (DPO): a row's prompt and two answers in each layout, each side encoded
  handlers     turn rows into token sequences (plain text, Alpaca, prompt/completion, OpenAI messages and
               ShareGPT as Mistral chats, preference pairs)
  hf_datasets  the arrow files of one split of a Hugging Face `datasets` folder
  readers      expand --input into files and read each in chunks that carry their origin
  formats      the format a run reads: the one named, or for --handler auto the one the columns say
  summary      PreprocessSummary: counts, skip examples and the printed report
  progress     the one-line progress report on stderr
  pipeline     preprocess(): the worker pool and the writers
  cli          the argparse parser and main(argv)
"""
