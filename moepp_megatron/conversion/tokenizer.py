"""The run's sentencepiece model as a Hugging Face tokenizer that works offline.

Writes ``tokenizer.model`` (the sentencepiece file, unchanged), ``tokenizer.json`` (the same
tokenizer for the ``tokenizers`` library, built from the model file's own settings) and a
``tokenizer_config.json`` with ``PreTrainedTokenizerFast``, so ``AutoTokenizer.from_pretrained``
needs nothing else. Why not ``LlamaTokenizer``: transformers 5 rebuilds it with LLaMA-2's fixed
normaliser (none), which encodes differently from a sentencepiece model trained with other
normalisation rules (``nmt_nfkc`` and whitespace folding, the sentencepiece defaults that
``moepp-tokenizer train --fold-whitespace`` uses); ``tokenizer.json`` carries the model's own rules.

No BOS/EOS is added when encoding: pretraining documents are token ids followed by EOS, with
no BOS (``moepp-preprocess``). Padding is on the left (for batched generation) with the unknown
piece as the pad token (see ``SpecialTokens.pad_id``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from moepp_megatron.conversion.hf_files import write_json

# Piece types of sentencepiece_model.proto.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_BPE = 2  # trainer_spec.model_type
SAMPLE_TEXTS = (
    "Hello world",
    "  leading and  double  spaces, trailing  ",
    "def f(x):\n    return x ** 2  # comment\n\ttabbed",
    "Ünïcödé ｆｕｌｌｗｉｄｔｈ ① ﬁ café 東京 🙂",
    "numbers 1234567890 and symbols <>{}[]|\\~`",
)


@dataclass
class SpecialTokens:
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    vocab_size: int

    @property
    def pad_id(self) -> int | None:
        """The unknown piece, as LLaMA fine-tuning pads. The model sees a pad only under a zero
        attention mask; unlike EOS it is not what a text ends with, so a data collator that
        drops pad positions from the loss keeps the EOS labels, and a prompt that ends with
        EOS is not mistaken for right padding by ``generate``."""
        return self.unk_id


def _load_proto(model_file: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:  # the pb2 module needs protobuf
        raise ImportError("reading a sentencepiece model file needs protobuf: pip install protobuf") from err
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def build_tokenizer(model_file: Path):
    """A ``tokenizers.Tokenizer`` that encodes like ``SentencePieceProcessor.encode``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = _load_proto(model_file)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = pieces[spec.unk_id][0]
    if spec.model_type != _BPE:
        raise ValueError(f"{model_file}: sentencepiece model type {spec.model_type} is not BPE (LLaMA-2 style)")
    if any(kind == _USER_DEFINED for _, _, kind in pieces):
        raise ValueError(f"{model_file}: user-defined pieces are not supported by the conversion")
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == _NORMAL}
    # sentencepiece merges the pair whose result has the highest score first.
    ranked = sorted(
        (-score, i, piece[:cut], piece[cut:])
        for piece, (score, i) in normal.items()
        for cut in range(1, len(piece))
        if piece[:cut] in normal and piece[cut:] in normal
    )
    model = BPE(
        vocab=vocab, merges=[(left, right) for _, _, left, right in ranked], unk_token=unk,
        fuse_unk=True, byte_fallback=spec.byte_fallback, dropout=None,
    )
    tokenizer = Tokenizer(model)

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        # sentencepiece folds only spaces (newlines and tabs stay).
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)

    special = [AddedToken(p, special=True, normalized=False) for p, _, k in pieces if k in (_CONTROL, _UNKNOWN)]
    tokenizer.add_special_tokens(special)

    steps = [decoders.Replace("▁", " ")]
    if spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def special_tokens(model_file: Path) -> SpecialTokens:
    spec = _load_proto(model_file).trainer_spec
    import sentencepiece

    size = sentencepiece.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    return SpecialTokens(
        bos_id=spec.bos_id if spec.bos_id >= 0 else None,
        eos_id=spec.eos_id if spec.eos_id >= 0 else None,
        unk_id=spec.unk_id if spec.unk_id >= 0 else None,
        vocab_size=size,
    )


def mismatches(model_file: Path, tokenizer, texts=SAMPLE_TEXTS) -> list[str]:
    """The texts that ``tokenizer`` encodes differently from sentencepiece."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return [text for text in texts if sp.encode(text) != tokenizer.encode(text, add_special_tokens=False).ids]


def write_hf_tokenizer(model_file: Path, directory: Path, *, model_max_length: int) -> SpecialTokens:
    """tokenizer.model + tokenizer.json + tokenizer_config.json + special_tokens_map.json
    (left padding, pad = unk)."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {model_file}")
    tokenizer = build_tokenizer(model_file)
    differ = mismatches(model_file, tokenizer)
    if differ:
        raise ValueError(
            f"{model_file}: the converted tokenizer encodes {differ[0]!r} differently from sentencepiece"
        )
    shutil.copyfile(model_file, directory / "tokenizer.model")
    tokenizer.save(str(directory / "tokenizer.json"))
    ids = special_tokens(model_file)
    pieces = [p.piece for p in _load_proto(model_file).pieces]

    def piece(index):
        return pieces[index] if index is not None else None

    names = {
        "bos_token": piece(ids.bos_id), "eos_token": piece(ids.eos_id), "unk_token": piece(ids.unk_id),
        "pad_token": piece(ids.pad_id),
    }
    write_json(directory / "special_tokens_map.json", {k: v for k, v in names.items() if v is not None})
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **names,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": model_max_length,
            "padding_side": "left",
            # transformers 4 would also return token_type_ids, which the model does not take.
            "model_input_names": ["input_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False,
        },
    )
    return ids
