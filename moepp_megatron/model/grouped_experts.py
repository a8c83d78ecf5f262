"""FFN experts as grouped GEMMs when Transformer Engine is absent: ``torch._grouped_mm``.

megatron-core 0.16.1 runs grouped experts through ``TEGroupedMLP`` (Transformer Engine) or
its legacy ``GroupedMLP``, which needs the separately built ``grouped_gemm`` package and
bf16; it never calls torch's native grouped matmul. :class:`TorchGroupedMLP` is megatron's
``GroupedMLP`` (same parameters, same sharded-checkpoint layout, which dist_checkpointing
converts to and from ``SequentialMLP`` checkpoints) with its two GEMMs done by
``torch._grouped_mm``: a CUTLASS kernel on Hopper (bf16), a loop of matmuls on CPU.

:func:`grouped_gemm_backend` decides what ``model.moe.grouped_gemm: true`` becomes.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.experts import GroupedMLP

from moepp_megatron.compat.megatron_internals import grouped_gemm_package_not_required


def torch_grouped_mm_supported(bf16: bool) -> bool:
    """torch._grouped_mm runs here: CPU (any dtype), or a Hopper (sm90+) GPU with bf16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if not torch.cuda.is_available():
        return True
    return bf16 and torch.cuda.get_device_capability() >= (9, 0)


def grouped_gemm_backend(requested: bool, transformer_engine: bool, bf16: bool) -> Optional[str]:
    """``"transformer_engine"`` (megatron's TEGroupedMLP), ``"torch"`` (TorchGroupedMLP) or
    None (megatron's SequentialMLP, one GEMM pair per expert)."""
    if not requested:
        return None
    if transformer_engine:
        return "transformer_engine"
    if torch_grouped_mm_supported(bf16):
        return "torch"
    warnings.warn(
        "model.moe.grouped_gemm: no Transformer Engine and torch._grouped_mm needs a Hopper "
        "GPU with bf16 here; the experts run as SequentialMLP"
    )
    return None


class TorchGroupedMLP(GroupedMLP):
    """megatron's GroupedMLP computed with ``torch._grouped_mm`` (no grouped_gemm package)."""

    def __init__(self, num_local_experts: int, config, pg_collection=None) -> None:
        if config.moe_apply_probs_on_input:
            raise ValueError("TorchGroupedMLP: moe_apply_probs_on_input is not supported")
        with grouped_gemm_package_not_required():
            super().__init__(num_local_experts, config, pg_collection)

    def _activation(self, fc1_TF: torch.Tensor, probs_T1: torch.Tensor) -> torch.Tensor:
        # As megatron's unfused MLP: act(gate) * up, scaled by the routing probability.
        if self.config.gated_linear_unit:
            gate_TF, up_TF = torch.chunk(fc1_TF, 2, dim=-1)
            hidden_TF = self.config.activation_func(gate_TF) * (up_TF + self.config.glu_linear_offset)
        else:
            hidden_TF = self.config.activation_func(fc1_TF)
        return (hidden_TF * probs_T1).to(fc1_TF.dtype)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x_TD = permuted_local_hidden_states
        # Group ends; the counts come from the dispatcher on the host, so this is a copy to
        # the device, not a sync.
        offsets_E = torch.cumsum(tokens_per_expert, dim=0).to(device=x_TD.device, dtype=torch.int32)
        w1_EDF = self.weight1.view(self.num_local_experts, self.config.hidden_size, -1)
        w2_EFD = self.weight2.view(self.num_local_experts, -1, self.config.hidden_size)
        fc1_TF = torch._grouped_mm(x_TD, w1_EDF, offs=offsets_E)
        probs_T1 = permuted_probs.unsqueeze(-1)
        if not self.activation_recompute:
            return torch._grouped_mm(self._activation(fc1_TF, probs_T1), w2_EFD, offs=offsets_E), None
        self.activation_checkpoint = tensor_parallel.CheckpointWithoutOutput()
        hidden_TF = self.activation_checkpoint.checkpoint(self._activation, fc1_TF, probs_T1)
        out_TD = torch._grouped_mm(hidden_TF, w2_EFD, offs=offsets_E)
        self.activation_checkpoint.discard_output_and_register_recompute(out_TD)
        return out_TD, None
