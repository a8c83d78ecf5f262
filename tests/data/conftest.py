"""Fixtures of the data tests: one tiny sentencepiece model for the whole session."""

from __future__ import annotations

import pytest

from tests.fixtures import tiny_sentencepiece


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """Path of a 400-piece LLaMA-style sentencepiece model."""
    return tiny_sentencepiece(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def sp_reference(sp_model):
    """The same model in plain sentencepiece: the independent encoder the tests compare to."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_model))
