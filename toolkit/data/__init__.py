"""Data: from text files and datasets to the token streams the recipes train and evaluate on.

  files        - the file-type table, one reader per type (.txt/.md, .jsonl/.json, .parquet, .csv), the null rule
  corpus       - a corpus's documents in a fixed order, in batches (files, datasets, the embedded default corpus);
                 the one EOS packing
  store        - the token store: layout, the one manifest schema (written, resumed, read), the shard reader
  tokenize_pool - batched tokenization in worker processes, results in order
  prepare      - build a token store from a corpus in parallel, in bounded memory, resumable
  blocks       - training blocks: a store's split by index, or a streamed dataset packed on the fly
  order        - the seeded order training blocks are read in, and the data position a checkpoint records
  pretrain     - recipes/pretrain.py's one entry point: which data, which tokenizer, the prepared-store cache
  sft          - fine-tuning data (text, prompt/completion, chat) for trl, and GPT-2's chat template

Importing this package imports nothing: `toolkit prepare` and `toolkit eval` load only the modules they use.
"""
