"""The data path: raw corpora -> indexed datasets -> megatron's blended GPT datasets.

``tokenizer`` (the sentencepiece model, padded vocab size), ``readers`` (documents out of
jsonl / jsonl.gz / jsonl.zst / json.gz / parquet), ``train_tokenizer`` (the ``moepp-tokenizer``
command: documents -> a sentencepiece model), ``preprocess`` (the ``moepp-preprocess``
command: documents -> ``PREFIX.bin``/``.idx``), ``cli`` (what the two commands share) and
``blend`` (mixture files -> weighted sources -> train/valid/test datasets).
"""
