"""The sentencepiece tokenizer (a LLaMA-2 style ``.model`` file; vocab size from the model).

Built on ``megatron.core.tokenizers`` rather than on sentencepiece directly: in 0.16.1 its
``GPTTokenizer`` with the ``sentencepiece`` library is exactly this tokenizer, and the object
it gives is what megatron's datasets take as ``GPTDatasetConfig.tokenizer`` (they read
``eod``, ``pad``, ``vocab_size`` and ``unique_identifiers``, the last one keys the index
cache). Its ``from_pretrained`` wants a metadata JSON next to the model file; constructing
the class with the metadata dict in hand skips that file. The subclass below only adds the
``encode``/``decode`` names the rest of this package uses.

Special ids follow the model file: LLaMA-2's has bos 1, eos 2 and no pad token, which
sentencepiece reports as ``pad_id == -1`` (megatron's datasets treat -1 as "no pad").
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron.core.tokenizers.text.models import GPTTokenizer

__all__ = ["SentencePieceTokenizer", "load_tokenizer", "padded_vocab_size"]

_INSTALL_HINT = "the sentencepiece package is needed to tokenize: pip install sentencepiece"


class SentencePieceTokenizer(GPTTokenizer):
    """megatron's sentencepiece ``GPTTokenizer`` (eod = eos) plus ``encode``/``decode``."""

    def encode(self, text: str) -> list[int]:
        return self.tokenize(text)

    def decode(self, ids) -> str:
        return self.detokenize(ids)


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer:
    """Load a sentencepiece model file; errors name the path."""
    try:
        import sentencepiece  # noqa: F401  (megatron only records whether it imports)
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    try:
        return SentencePieceTokenizer(path=str(path), config={"library": "sentencepiece"})
    except (RuntimeError, OSError) as err:
        raise ValueError(f"{path}: not a readable sentencepiece model ({err})") from err


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    """The embedding rows: ``vocab_size`` rounded up to a multiple of divisible_by * TP.

    Same rule as Megatron-LM's ``_vocab_size_with_padding``, so embeddings line up with
    checkpoints made there.
    """
    if vocab_size < 1 or tensor_parallel < 1 or divisible_by < 1:
        raise ValueError(
            f"padded_vocab_size: need positive sizes, got vocab_size={vocab_size}, "
            f"tensor_parallel={tensor_parallel}, divisible_by={divisible_by}"
        )
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple
