"""Megatron and Hugging Face sides of the conversion tests, in this (single) process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moepp_megatron.config.schema import ParallelConfig


def megatron_model(run_dir: Path):
    """The checkpoint's megatron model at TP=PP=EP=1, dropless (HF inference is dropless),
    in eval mode."""
    from moepp_megatron.conversion.megatron_checkpoint import load_state, resolve_checkpoint
    from moepp_megatron.model.builder import build_model

    run, state = load_state(*resolve_checkpoint(run_dir))
    model = dataclasses.replace(run.model, moe=dataclasses.replace(run.model.moe, capacity_factor=None))
    (gpt,) = build_model(model, ParallelConfig(cpu_mode=True))
    result = gpt.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    return gpt.eval()


@torch.no_grad()
def megatron_logits(gpt, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    return gpt(ids, positions, None)


@torch.no_grad()
def megatron_greedy(gpt, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding that recomputes the full forward pass at every step."""
    for _ in range(new_tokens):
        ids = torch.cat([ids, megatron_logits(gpt, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def hf_model(hf_dir: Path):
    """The converted model, in the dtype it was exported in."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, torch_dtype="auto")
    return model.eval()


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from moepp_megatron.conversion.hf_files import read_safetensors

    return read_safetensors(Path(hf_dir))
