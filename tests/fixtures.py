"""Small on-disk artefacts that tests build for themselves (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

from moepp_megatron.data.local_corpus import python_docs_corpus
from moepp_megatron.data.train_tokenizer import train_sentencepiece


def tiny_sentencepiece(directory: Path, vocab_size: int = 400) -> Path:
    """A LLaMA-2 style sentencepiece model trained on CPython's help topics (< 0.1 s), with
    sentencepiece's default normaliser (whitespace folded): the Hugging Face export converts
    that normaliser, and its tests use this model."""
    from pydoc_data.topics import topics

    documents = [topics[name] for name in sorted(topics)]
    path = Path(directory) / f"tiny-{vocab_size}.model"
    return train_sentencepiece(documents, path, vocab_size, keep_whitespace=False)


def tiny_blend(directory: Path) -> tuple[Path, list[Path]]:
    """(tokenizer model, three dataset prefixes) built from CPython's own documentation."""
    from moepp_megatron.data.preprocess import preprocess

    directory = Path(directory)
    tokenizer = tiny_sentencepiece(directory)
    prefixes = []
    for name, documents in python_docs_corpus().items():
        raw = directory / f"{name}.jsonl"
        raw.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
        preprocess([str(raw)], directory / name, tokenizer)
        prefixes.append(directory / name)
    return tokenizer, prefixes
