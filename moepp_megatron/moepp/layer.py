"""The MoE++ layer: megatron's MoELayer with zero-computation experts beside the FFN experts.

Steps (megatron's named seams, plus one): route over all N experts -> the FFN columns go
through the stock preprocess / dispatch / routed_experts_compute / combine / postprocess ->
the ZC columns are computed locally on the undispatched tokens -> sum. Tokens whose picks
are all ZC experts cost no dispatcher traffic.

Host-device synchronisation (audit of the MoE++ additions; ``moepp-bench`` README section):
routing and ZC experts add none. The layer's one sync is the dispatcher's: the alltoall
dispatcher needs its split sizes on the host. Dropless MoE++ moves it earlier, to
"before_permutation_1" (see token_dispatcher.py), because the number of FFN rows is
data-dependent; stock megatron does the same in its capacity-factor branch.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from moepp_megatron.compat.megatron_internals import replace_token_dispatcher
from moepp_megatron.moepp.config import MoEPPTransformerConfig
from moepp_megatron.moepp.token_dispatcher import MoEPPAlltoAllTokenDispatcher
from moepp_megatron.moepp.zero_computation_experts import ZeroComputationExperts


class MoEPPLayer(MoELayer):
    config: MoEPPTransformerConfig

    def __init__(
        self,
        config: MoEPPTransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
    ) -> None:
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        if config.moe_token_dispatcher_type == "alltoall":
            replace_token_dispatcher(self, MoEPPAlltoAllTokenDispatcher, pg_collection)
        self.zc_experts = ZeroComputationExperts(
            config.hidden_size,
            num_constant=config.moepp_num_constant_experts,
            num_copy=config.moepp_num_copy_experts,
            num_zero=config.moepp_num_zero_experts,
            init_method=config.init_method if config.perform_initialization else (lambda t: None),
            params_dtype=config.params_dtype,
            compile=config.moepp_compile,
        )
        for param in self.zc_experts.parameters():
            # Replicated over TP; grads differ per rank under sequence parallelism.
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_residual: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ):
        """Returns ``(output [S, B, D], mlp_bias (None), router logits [S, B, N])``.

        ``router_residual`` is the previous MoE++ layer's logits (None for the first one).
        """
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE++ with tensor parallelism needs sequence_parallel during training")
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        if self.moe_layer_recompute:
            # The residual is an argument, so the recomputed forward sees the same logits.
            return tensor_parallel.checkpoint(
                self._forward, False, hidden_states, router_residual, padding_mask
            )
        return self._forward(hidden_states, router_residual, padding_mask)

    def _forward(self, hidden_states, router_residual, padding_mask):
        gates_TN, routing_map_TN, logits_SBN = self.router(
            hidden_states, router_residual, padding_mask=padding_mask
        )
        expert_input = hidden_states
        if self.config.moepp_routing == "release":
            # The released checkpoint feeds every expert k * x (the router still sees x).
            expert_input = hidden_states * self.config.moe_router_topk
        num_ffn = self.config.num_moe_experts
        zc_output = self.zc_experts(
            expert_input.reshape(-1, expert_input.shape[-1]), gates_TN[:, num_ffn:]
        ).view_as(hidden_states)

        ffn_input, ffn_gates = self.preprocess(
            expert_input, gates_TN[:, :num_ffn].contiguous(), routing_map_TN[:, :num_ffn].contiguous()
        )
        ffn_input, ffn_gates = self.dispatch(ffn_input, ffn_gates)
        output, mlp_bias = self.routed_experts_compute(ffn_input, ffn_gates)
        output = self.postprocess(self.combine(output), shared_expert_output=None)
        return output + zc_output, mlp_bias, logits_SBN
