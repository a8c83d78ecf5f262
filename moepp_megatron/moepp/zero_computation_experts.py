"""The zero-computation (ZC) experts of MoE++, all computed in one vectorised pass.

Plain torch, no megatron import: these experts are replicated on every rank and never go
through a token dispatcher. Column order of ``gates`` follows the router:
``[constant experts | copy experts | zero experts]``.

- zero:     E(x) = 0
- copy:     E(x) = x
- constant: E(x) = a1 * x + a2 * v,  [a1, a2] = softmax(W_c x),  W_c in R^{2 x D}, v in R^D

Host-device synchronisation: none (fixed shapes, no data-dependent indexing).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moepp_megatron.moepp.compiled import compiled


def zc_experts_forward(
    x_TD: torch.Tensor,
    gates_TZ: torch.Tensor,
    constant_gates_C2D: torch.Tensor,
    constant_vectors_CD: torch.Tensor,
    num_copy: int,
) -> torch.Tensor:
    """sum_z gates[t, z] * E_z(x_t), for every token at once, in fp32.

    All expert terms on x fold into one per-token scale (copy gates + a1-weighted constant
    gates), so the output is one [T, D] pass plus a [T, C] x [C, D] matmul for the v terms.
    """
    num_constant = constant_vectors_CD.shape[0]
    gates_TZ = gates_TZ.float()
    x_float_TD = x_TD.float()
    scale_T1 = gates_TZ[:, num_constant : num_constant + num_copy].sum(dim=-1, keepdim=True)
    if not num_constant:
        return (x_float_TD * scale_T1).to(x_TD.dtype)
    gates_TC = gates_TZ[:, :num_constant]
    mix_TC2 = torch.softmax(torch.einsum("td,ckd->tck", x_float_TD, constant_gates_C2D.float()), dim=-1)
    scale_T1 = scale_T1 + (gates_TC * mix_TC2[..., 0]).sum(dim=-1, keepdim=True)
    weight_on_v_TC = gates_TC * mix_TC2[..., 1]
    out_TD = torch.addmm(x_float_TD * scale_T1, weight_on_v_TC, constant_vectors_CD.float())
    return out_TD.to(x_TD.dtype)


class ZeroComputationExperts(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_constant: int,
        num_copy: int,
        num_zero: int,
        init_method: Callable[[torch.Tensor], None],
        params_dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.num_constant = num_constant
        self.num_copy = num_copy
        self.num_zero = num_zero
        self.compile = compile
        # Every rank holds the same full copy; shapes never depend on the parallel layout.
        vectors = torch.empty(num_constant, hidden_size, dtype=params_dtype)
        gates = torch.empty(num_constant, 2, hidden_size, dtype=params_dtype)
        if num_constant:
            self.constant_vectors, self.constant_gates = nn.Parameter(vectors), nn.Parameter(gates)
            init_method(self.constant_vectors)
            init_method(self.constant_gates)
        else:
            # Without constant experts, no parameters at all: dist_checkpointing cannot shard
            # an empty tensor (ZeroDivisionError in its sharding validation).
            self.register_buffer("constant_vectors", vectors, persistent=False)
            self.register_buffer("constant_gates", gates, persistent=False)

    @property
    def num_experts(self) -> int:
        return self.num_constant + self.num_copy + self.num_zero

    def forward(self, x_TD: torch.Tensor, gates_TZ: torch.Tensor) -> torch.Tensor:
        """sum_z gates[t, z] * E_z(x_t), for every token at once.

        Gates of unpicked (or dropped) experts are zero, so computing every expert for every
        token is exact; it costs O(T * D * num_constant), far below one FFN expert.
        """
        forward = compiled(zc_experts_forward) if self.compile else zc_experts_forward
        return forward(x_TD, gates_TZ, self.constant_gates, self.constant_vectors, self.num_copy)
