"""Hugging Face MoE++ model directory (ours or the released MoE++-7B) -> a megatron dist
checkpoint in the trainer's layout, as iteration 0 of a new run:

    OUTPUT/latest_checkpointed_iteration.txt
    OUTPUT/iter_0000000/                  (dist checkpoint + config.yaml)
    OUTPUT/run.yaml                       (the model, parallel and tokenizer sections)
    OUTPUT/tokenizer.model                (when the HF directory has one)

Continue pretraining with ``moepp-train --config OUTPUT/run.yaml --config <recipe> ...
checkpoint.init_from=OUTPUT``. The parallel flags set the layout written into the config;
the checkpoint itself loads under any layout.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import yaml

from moepp_megatron.config.loader import from_dict, to_dict
from moepp_megatron.config.schema import DataConfig, ModelConfig, ParallelConfig, RunConfig
from moepp_megatron.conversion import hf_files
from moepp_megatron.conversion.hf_config import check_weights, from_hf_config
from moepp_megatron.conversion.hf_names import hf_to_megatron
from moepp_megatron.conversion.megatron_checkpoint import save_state
from moepp_megatron.data.tokenizer import padded_vocab_size

RUN_CONFIG = "run.yaml"
_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class ImportReport:
    output: Path
    model: ModelConfig
    parallel: ParallelConfig
    padded_vocab_rows: int
    tokenizer: Optional[Path]
    seconds: float


def apply_model_overrides(model: ModelConfig, overrides: Iterable[str]) -> ModelConfig:
    """``model.a.b=value`` overrides (e.g. ``model.moe.capacity_factor=null``) for fields
    the HF config does not carry."""
    data = {"model": to_dict(model)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("model."):
            raise ValueError(f"override {item!r}: expected model.dotted.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return from_dict(RunConfig, data, where="from-hf overrides").model


def _pad_vocab(state: dict[str, torch.Tensor], rows: int) -> None:
    """Zero rows up to megatron's padded vocabulary (never sampled: ids beyond the tokenizer)."""
    for name in _VOCAB_TENSORS:
        t = state[name]
        state[name] = torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])


def _check_tokenizer_vocab(tokenizer: Path, vocab: int, tensor: int, divisible_by: int) -> None:
    """The trainer sizes the embedding from the tokenizer: it must come out the same."""
    from moepp_megatron.conversion.tokenizer import special_tokens

    pieces = special_tokens(tokenizer).vocab_size
    if padded_vocab_size(pieces, tensor, divisible_by) != vocab:
        raise ValueError(
            f"{tokenizer} has {pieces} pieces, which megatron pads to "
            f"{padded_vocab_size(pieces, tensor, divisible_by)} rows, but the model has {vocab} "
            f"(after padding for TP={tensor} and --vocab-size-divisible-by {divisible_by})"
        )


def import_from_hf(
    hf_dir: str | Path,
    output: str | Path,
    *,
    tensor: int = 1,
    pipeline: int = 1,
    expert: int = 1,
    virtual_pipeline: Optional[int] = None,
    vocab_size_divisible_by: int = 128,
    overrides: Iterable[str] = (),
) -> ImportReport:
    hf_files.require_hf()
    from moepp_megatron.model.builder import transformer_config

    start = time.perf_counter()
    hf_dir, output = Path(hf_dir), Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    config = hf_files.read_config(hf_dir)
    model = from_hf_config(config)
    state = hf_files.read_safetensors(hf_dir)
    check_weights(state, config, f"the safetensors of {hf_dir}")
    model = apply_model_overrides(model, overrides)

    tokenizer = hf_dir / "tokenizer.model"
    vocab = padded_vocab_size(model.vocab_size, tensor, vocab_size_divisible_by)
    if tokenizer.is_file():
        _check_tokenizer_vocab(tokenizer, vocab, tensor, vocab_size_divisible_by)
    padded_rows = vocab - model.vocab_size
    if padded_rows:
        _pad_vocab(state, vocab)
        model = dataclasses.replace(model, vocab_size=vocab)
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert, virtual_pipeline=virtual_pipeline)
    # megatron's own checks of the layout against the model (divisibility, EP vs experts).
    transformer_config(model, parallel)
    data = DataConfig(vocab_size_divisible_by=vocab_size_divisible_by)
    run = RunConfig(run_dir=str(output), model=model, parallel=parallel, data=data)

    megatron_state = hf_to_megatron(state, model)
    del state  # the renamed tensors are the same objects; the split ones are no longer needed
    output.mkdir(parents=True, exist_ok=True)
    copied = None
    if tokenizer.is_file():
        copied = output / "tokenizer.model"
        shutil.copyfile(tokenizer, copied)
        run = dataclasses.replace(run, data=dataclasses.replace(data, tokenizer_model=str(copied.resolve())))
    save_state(megatron_state, run, output, iteration=0)
    sections = to_dict(run)
    fragment = {
        "model": sections["model"],
        "parallel": {k: sections["parallel"][k] for k in ("tensor", "pipeline", "expert", "virtual_pipeline")},
        "data": {k: sections["data"][k] for k in ("tokenizer_model", "vocab_size_divisible_by")},
    }
    (output / RUN_CONFIG).write_text(yaml.safe_dump(fragment, sort_keys=False))
    return ImportReport(
        output=output, model=model, parallel=parallel, padded_vocab_rows=padded_rows,
        tokenizer=copied, seconds=time.perf_counter() - start,
    )
