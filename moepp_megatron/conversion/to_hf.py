"""Megatron dist checkpoint (any layout) -> Hugging Face MoE++ model directory."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moepp_megatron.conversion import hf_files
from moepp_megatron.conversion.hf_config import check_weights, is_release_format, to_hf_config
from moepp_megatron.conversion.hf_names import megatron_to_hf
from moepp_megatron.conversion.megatron_checkpoint import load_state, resolve_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class ExportReport:
    output: Path
    iteration: int
    num_tensors: int
    num_parameters: int
    shards: list[str]
    release_format: bool
    tokenizer: Optional[Path]
    seconds: float


def _make_readable(directory: Path) -> None:
    # mkdtemp (and safetensors) create owner-only files; a model directory is for sharing.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def export_to_hf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    iteration: Optional[int] = None,
    dtype: str = "bf16",
    tokenizer: Optional[str | Path] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportReport:
    """Write the HF model of a megatron checkpoint to ``output`` (which must not exist yet).

    ``tokenizer`` overrides the run's ``data.tokenizer_model``; without either, no tokenizer
    files are written.
    """
    hf_files.require_hf()
    from moepp_megatron.conversion.tokenizer import special_tokens, write_hf_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    start = time.perf_counter()
    directory, iteration = resolve_checkpoint(checkpoint, iteration)
    run, state = load_state(directory, iteration)
    tokenizer = tokenizer or run.data.tokenizer_model
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer model {tokenizer} not found (give the run's sentencepiece model with --tokenizer)")
    ids = special_tokens(Path(tokenizer)) if tokenizer else None
    config = to_hf_config(
        run.model, torch_dtype=_DTYPE_NAMES[dtype], bos_token_id=ids.bos_id if ids else None,
        eos_token_id=ids.eos_id if ids else None, pad_token_id=ids.pad_id if ids else None,
    )
    hf_state = megatron_to_hf(state, run.model)
    check_weights(hf_state, config, f"the converted checkpoint {directory} (iteration {iteration})")
    hf_state = {name: t.detach().to(DTYPES[dtype]) for name, t in hf_state.items()}

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        shards = hf_files.write_safetensors(hf_state, staging, max_shard_bytes)
        hf_files.write_json(staging / "config.json", config)
        special = ("bos_token_id", "eos_token_id", "pad_token_id")
        hf_files.write_json(staging / "generation_config.json", {k: config[k] for k in special if k in config})
        hf_files.copy_code_files(staging)
        if tokenizer:
            write_hf_tokenizer(Path(tokenizer), staging, model_max_length=run.model.seq_length)
        _make_readable(staging)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(
        output=output, iteration=iteration, num_tensors=len(hf_state),
        num_parameters=sum(t.numel() for t in hf_state.values()), shards=shards,
        release_format=is_release_format(config), tokenizer=Path(tokenizer) if tokenizer else None,
        seconds=time.perf_counter() - start,
    )
