"""The zero-computation (ZC) experts of MoE++, all computed in one vectorised pass.

Plain torch, no megatron import: these experts are replicated on every rank and never go
through a token dispatcher. Column order of ``gates`` follows the router:
``[constant experts | copy experts | zero experts]``.

- zero:     E(x) = 0
- copy:     E(x) = x
- constant: E(x) = a1 * x + a2 * v,  [a1, a2] = softmax(W_c x),  W_c in R^{2 x D}, v in R^D
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ZeroComputationExperts(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_constant: int,
        num_copy: int,
        num_zero: int,
        init_method: Callable[[torch.Tensor], None],
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_constant = num_constant
        self.num_copy = num_copy
        self.num_zero = num_zero
        # Every rank holds the same full copy; shapes never depend on the parallel layout.
        self.constant_vectors = nn.Parameter(torch.empty(num_constant, hidden_size, dtype=params_dtype))
        self.constant_gates = nn.Parameter(torch.empty(num_constant, 2, hidden_size, dtype=params_dtype))
        init_method(self.constant_vectors)
        init_method(self.constant_gates)

    @property
    def num_experts(self) -> int:
        return self.num_constant + self.num_copy + self.num_zero

    def forward(self, x_TD: torch.Tensor, gates_TZ: torch.Tensor) -> torch.Tensor:
        """sum_z gates[t, z] * E_z(x_t), for every token at once.

        Gates of unpicked (or dropped) experts are zero, so computing every expert for every
        token is exact; it costs O(T * D * num_constant), far below one FFN expert.
        """
        gates_TZ = gates_TZ.float()
        x_float_TD = x_TD.float()
        copy_weight_T1 = gates_TZ[:, self.num_constant : self.num_constant + self.num_copy].sum(
            dim=-1, keepdim=True
        )
        out_TD = x_float_TD * copy_weight_T1
        if self.num_constant:
            gates_TC = gates_TZ[:, : self.num_constant]
            mix_TC2 = torch.softmax(
                torch.einsum("td,ckd->tck", x_float_TD, self.constant_gates.float()), dim=-1
            )
            weight_on_x_T1 = (gates_TC * mix_TC2[..., 0]).sum(dim=-1, keepdim=True)
            weight_on_v_TC = gates_TC * mix_TC2[..., 1]
            out_TD = out_TD + x_float_TD * weight_on_x_T1 + weight_on_v_TC @ self.constant_vectors.float()
        return out_TD.to(x_TD.dtype)
