"""Small on-disk artefacts that tests build for themselves (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path


def tiny_sentencepiece(directory: Path, vocab_size: int = 400) -> Path:
    """Train a LLaMA-2 style sentencepiece model (BPE, byte fallback, unk 0 / bos 1 / eos 2,
    no pad) on the English help texts every CPython ships (``pydoc_data.topics``); returns
    the ``.model`` path. Takes well under a second; deterministic for a given vocab size."""
    import sentencepiece as spm
    from pydoc_data.topics import topics

    # sentencepiece drops "sentences" over 4 kB, so train on lines, not whole topics.
    lines = [line for name in sorted(topics) for line in topics[name].splitlines() if line.strip()]
    path = Path(directory) / f"tiny-{vocab_size}.model"
    with open(path, "wb") as model_file:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model_file,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    return path
