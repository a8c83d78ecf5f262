"""Megatron's TransformerConfig extended with the MoE++ fields.

``num_moe_experts`` stays the number of FFN experts (N_ffn): megatron-core derives the
expert-parallel split, dispatcher shapes and expert modules from it. The zero-computation
(ZC) experts live only in the fields below. Router columns are ordered
``[FFN experts | constant | copy | zero]`` (the released checkpoint's order).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class MoEPPTransformerConfig(TransformerConfig):
    moepp_num_zero_experts: int = 1
    moepp_num_copy_experts: int = 1
    moepp_num_constant_experts: int = 2
    # eta for ZC experts in the load-balance loss and the capacity split (Eq. 7/8).
    moepp_tau: float = 0.75
    # "linear" (paper) or "mlp": Linear(D, 8N) -> tanh -> Linear(8N, N) (released checkpoint).
    moepp_router: str = "linear"
    moepp_gating_residual: bool = True
    # "paper" or "release"; see docs/MOEPP_SPEC.md, "Two routing variants".
    moepp_routing: str = "paper"
    # gamma of Eq. 8; None = dropless. megatron's moe_expert_capacity_factor must stay None.
    moepp_capacity_factor: Optional[float] = None
    # Run routing and the ZC experts through torch.compile (fused kernels; see compiled.py).
    moepp_compile: bool = False

    def __post_init__(self) -> None:
        # Ours first: for the combinations MoE++ rules out, the MoE++ reason is the useful one.
        validate_moepp_config(self)
        super().__post_init__()

    @property
    def moepp_num_zc_experts(self) -> int:
        return (
            self.moepp_num_constant_experts
            + self.moepp_num_copy_experts
            + self.moepp_num_zero_experts
        )

    @property
    def moepp_num_experts(self) -> int:
        """N = N_ffn + N_zc: the router's width."""
        return self.num_moe_experts + self.moepp_num_zc_experts


def _fail(field_name: str, message: str) -> None:
    raise ValueError(f"MoE++ config: {field_name} {message}")


def validate_moepp_config(c: MoEPPTransformerConfig) -> None:
    """Reject combinations the MoE++ layer cannot compute correctly, naming the field."""
    if not c.num_moe_experts or c.num_moe_experts < 1:
        _fail("num_moe_experts", f"(N_ffn) must be >= 1, got {c.num_moe_experts}")
    for name in ("moepp_num_zero_experts", "moepp_num_copy_experts", "moepp_num_constant_experts"):
        if getattr(c, name) < 0:
            _fail(name, f"must be >= 0, got {getattr(c, name)}")
    if c.num_moe_experts % c.expert_model_parallel_size:
        _fail(
            "num_moe_experts",
            f"(N_ffn={c.num_moe_experts}) must be divisible by expert_model_parallel_size="
            f"{c.expert_model_parallel_size}",
        )
    if not c.moepp_tau > 0:
        _fail("moepp_tau", f"must be > 0, got {c.moepp_tau}")
    if c.moepp_router not in ("linear", "mlp"):
        _fail("moepp_router", f"must be 'linear' or 'mlp', got {c.moepp_router!r}")
    if c.moepp_routing not in ("paper", "release"):
        _fail("moepp_routing", f"must be 'paper' or 'release', got {c.moepp_routing!r}")
    if c.moepp_routing == "release" and c.moepp_num_zero_experts != 1:
        _fail(
            "moepp_num_zero_experts",
            f"must be exactly 1 for the release routing variant, got {c.moepp_num_zero_experts}",
        )
    if c.moe_router_topk > c.moepp_num_experts:
        _fail("moe_router_topk", f"({c.moe_router_topk}) exceeds N_ffn + N_zc = {c.moepp_num_experts}")
    if c.moepp_capacity_factor is not None and not c.moepp_capacity_factor > 0:
        _fail("moepp_capacity_factor", f"must be > 0 or None, got {c.moepp_capacity_factor}")
    _reject_unsupported(c)


def _reject_unsupported(c: MoEPPTransformerConfig) -> None:
    """Stock options that would bypass or break the MoE++ router, dispatcher or residual."""
    residual_across_stages = c.moepp_gating_residual and c.pipeline_model_parallel_size > 1
    unsupported = [
        ("moe_expert_capacity_factor", c.moe_expert_capacity_factor is not None,
         "use moepp_capacity_factor (heterogeneous capacity, Eq. 8)"),
        ("moe_token_dispatcher_type", c.moe_token_dispatcher_type not in ("alltoall", "allgather"),
         "must be 'alltoall' or 'allgather' (flex re-derives top-k and assumes k FFN picks)"),
        ("moe_token_dispatcher_type",
         residual_across_stages and c.moe_token_dispatcher_type == "allgather",
         "must be 'alltoall' with pipeline parallelism and gating residuals (the residual "
         "crosses stages in variable-shape p2p messages, which megatron's allgather "
         "dispatcher does not support)"),
        ("pipeline_model_parallel_layout",
         residual_across_stages and c.pipeline_model_parallel_layout is not None,
         "(custom pipeline layouts) is not supported with gating residuals; use "
         "num_layers_in_first/last_pipeline_stage for uneven splits"),
        ("moe_router_load_balancing_type", c.moe_router_load_balancing_type not in ("aux_loss", "none"),
         "must be 'aux_loss' (the heterogeneous loss) or 'none'"),
        ("moe_router_score_function", c.moe_router_score_function != "softmax",
         "must be 'softmax' (MoE++ routes with a softmax over all N experts)"),
        ("moe_router_enable_expert_bias", c.moe_router_enable_expert_bias, "is not supported"),
        ("moe_router_num_groups", c.moe_router_num_groups is not None, "is not supported"),
        ("moe_shared_expert_intermediate_size", c.moe_shared_expert_intermediate_size is not None,
         "is not supported"),
        ("moe_latent_size", bool(c.moe_latent_size), "is not supported"),
        ("mtp_num_layers", bool(c.mtp_num_layers), "(MTP) cannot carry the gating residual"),
        ("cuda_graph_impl", c.cuda_graph_impl not in (None, "none"),
         "(CUDA graphs) cannot carry the gating residual"),
        ("overlap_moe_expert_parallel_comm", c.overlap_moe_expert_parallel_comm,
         "cannot carry the gating residual"),
    ]
    for name, bad, why in unsupported:
        if bad:
            _fail(name, why)


CAPACITY_FIELDS = ("moepp_capacity_factor", "moe_expert_capacity_factor")


def has_capacity(config: TransformerConfig) -> bool:
    return any(getattr(config, name, None) is not None for name in CAPACITY_FIELDS)


@contextlib.contextmanager
def dropless(config: TransformerConfig) -> Iterator[None]:
    """Route without capacity inside the block (as the released inference code does), for
    MoE++ and vanilla layers alike: every layer of a model reads its capacity factor from
    this one config at routing time. Restored on exit, also after an exception."""
    saved = {name: getattr(config, name) for name in CAPACITY_FIELDS if hasattr(config, name)}
    try:
        for name in saved:
            setattr(config, name, None)
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
