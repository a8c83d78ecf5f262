"""The MoE++ router: one softmax over FFN and ZC experts, with gating residuals.

G^j(x) = R^j(x) + W_g^j G^{j-1}(x), where R is a linear map (paper) or
Linear(D, 8N) -> tanh -> Linear(8N, N) (released checkpoint), all in fp32. The previous
layer's logits arrive as an argument; they are never stored on the module, because
activation recomputation runs layers again out of order.

With ``moepp_compile`` the routing (softmax, top-k, gates, capacity) runs as one compiled
function (``compiled.py``). Host-device synchronisation added to the stock router: none
(capacities are computed in Python from the token count; counters stay on the device).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    get_tokens_per_expert_and_token_count,
    router_gating_linear,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from moepp_megatron.moepp.compiled import compiled
from moepp_megatron.moepp.config import MoEPPTransformerConfig
from moepp_megatron.moepp.counters import RoutingCounters
from moepp_megatron.moepp.routing import heterogeneous_capacity, load_balance_weights, route

ROUTER_MLP_EXPANSION = 8


class MoEPPRouter(RoutingCounters, TopKRouter):
    """Routes every token over N = N_ffn + N_zc experts.

    Parameters: ``weight`` ([N, D] linear router, or the [8N, D] first layer of the MLP
    router), ``output_weight`` ([N, 8N], MLP router only) and ``gate_map`` (W_g, [N, N]).
    ``gate_map`` exists in every layer, also the first, so all MoE++ layers hold the same
    parameters and dist_checkpointing can stack them.
    """

    config: MoEPPTransformerConfig

    def __init__(self, config: MoEPPTransformerConfig, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        num_experts = config.moepp_num_experts
        hidden = ROUTER_MLP_EXPANSION * num_experts if config.moepp_router == "mlp" else num_experts
        self.weight = torch.nn.Parameter(torch.empty(hidden, config.hidden_size, dtype=torch.float32))
        self.output_weight = (
            torch.nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32))
            if config.moepp_router == "mlp"
            else None
        )
        self.gate_map = torch.nn.Parameter(torch.empty(num_experts, num_experts, dtype=torch.float32))
        self.reset_parameters()
        # Column order: FFN experts, then constant, copy and zero experts.
        self.init_counters(config.num_moe_experts, (
            ("constant", config.moepp_num_constant_experts),
            ("copy", config.moepp_num_copy_experts),
            ("zero", config.moepp_num_zero_experts),
        ))

    def reset_parameters(self) -> None:
        # Called by the base constructor before the MoE++ parameters exist.
        super().reset_parameters()
        for name in ("output_weight", "gate_map"):
            param = getattr(self, name, None)
            if param is None:
                continue
            if self.config.perform_initialization:
                self.config.init_method(param)
            param.data = param.data.to(dtype=self.config.params_dtype)
            # Replicated across TP; under sequence parallelism each rank sees other tokens,
            # so finalize_model_grads must all-reduce these grads over TP.
            setattr(param, "sequence_parallel", self.config.sequence_parallel)

    @property
    def _router_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32

    def logits(self, x_SBD: torch.Tensor, residual_SBN: Optional[torch.Tensor]) -> torch.Tensor:
        """G(x) = R(x) [+ W_g G_prev], in the router dtype (fp32 unless fp64 is asked for)."""
        dtype = self._router_dtype
        logits = router_gating_linear(x_SBD, self.weight, None, dtype)
        if self.output_weight is not None:
            logits = router_gating_linear(torch.tanh(logits), self.output_weight, None, dtype)
        if self.config.moepp_gating_residual and residual_SBN is not None:
            logits = logits + router_gating_linear(residual_SBN, self.gate_map, None, dtype)
        else:
            # No residual to map (the first MoE++ layer, or gating residuals off): W_g still
            # takes part, with a zero gradient, because megatron's overlapped gradient
            # reduction (overlap_grad_reduce) waits for every parameter of a bucket. Adding
            # an exact zero leaves the logits bit for bit as they were.
            logits = logits + 0.0 * self.gate_map.sum()
        return logits

    def forward(
        self,
        input: torch.Tensor,
        router_residual: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(gates [T, N], routing_map [T, N] bool, logits [S, B, N])``.

        ``padding_mask`` is [T] or [S, B], True for padding tokens (megatron's convention).
        """
        input = self.apply_input_jitter(input)
        logits_SBN = self.logits(input, router_residual)
        gates_TN, routing_map_TN = self.routing(logits_SBN, padding_mask=padding_mask)
        return gates_TN, routing_map_TN, logits_SBN

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        c = self.config
        logits_TN = logits.reshape(-1, c.moepp_num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits_TN = self.apply_z_loss(logits_TN, padding_mask=padding_mask)
        capacity_N = None
        if c.moepp_capacity_factor is not None:
            capacity_N = self._capacity(logits_TN.shape[0], logits_TN.device)
        route_fn = compiled(route) if c.moepp_compile else route
        probs_TN, gates_TN, picked_TN, kept_TN = route_fn(
            logits_TN, self.topk, c.moepp_routing, c.moepp_num_zero_experts, capacity_N,
            c.moe_token_drop_policy,
        )
        if self.training and torch.is_grad_enabled():
            # Guarded like megatron's aux losses so activation recompute counts it once.
            gates_TN = self._apply_load_balance_loss(gates_TN, probs_TN, picked_TN, padding_mask)
            self.count(picked_TN, kept_TN, padding_mask)
        return gates_TN, kept_TN

    def _capacity(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        c = self.config
        ffn, zc = heterogeneous_capacity(
            num_tokens, self.topk, c.num_moe_experts, c.moepp_num_zc_experts,
            c.moepp_tau, c.moepp_capacity_factor,
        )
        capacity_N = torch.full((c.moepp_num_experts,), zc, dtype=torch.long, device=device)
        capacity_N[: c.num_moe_experts] = ffn
        return capacity_N

    def _apply_load_balance_loss(self, gates_TN, probs_TN, picked_TN, padding_mask):
        """Attach beta * L_b, L_b = sum_i eta_i f_i P_i (Eq. 7), via megatron's aux-loss path.

        megatron's switch loss is N/(k T^2) * coeff * sum_i count_i * sum_t p_ti; passing the
        eta-weighted probs and coeff = beta * k / N turns it into exactly beta * L_b, and
        keeps its TP/CP reduction of the counts (sequence-parallel tokens) for free.
        """
        c = self.config
        beta = c.moe_aux_loss_coeff
        if c.moe_router_load_balancing_type == "none" or not beta:
            return gates_TN
        if padding_mask is not None:
            valid_T1 = ~padding_mask.unsqueeze(-1)
            picked_TN, probs_TN = picked_TN & valid_T1, probs_TN * valid_T1
        tokens_per_expert, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
            picked_TN, self.tp_cp_group, topk=self.topk, with_padding_mask=padding_mask is not None
        )
        num_experts = c.moepp_num_experts
        eta_N = load_balance_weights(c.num_moe_experts, c.moepp_num_zc_experts, c.moepp_tau, probs_TN.device)
        lb_loss = switch_load_balancing_loss_func(
            probs=probs_TN * eta_N,
            tokens_per_expert=tokens_per_expert,
            total_num_tokens=total_tokens,
            topk=self.topk,
            num_experts=num_experts,
            moe_aux_loss_coeff=beta * self.topk / num_experts,
        )
        return self.attach_and_log_load_balancing_loss(
            gates_TN, beta, lb_loss, "load_balancing_loss", self.tp_cp_group,
            valid_token_count=local_tokens,
        )
