"""Config -> megatron GPTModel with MoE++ (or vanilla MoE) layers on a LLaMA backbone."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from moepp_megatron.config.schema import ModelConfig, ParallelConfig
from moepp_megatron.model.grouped_experts import grouped_gemm_backend
from moepp_megatron.model.specs import decoder_block_spec
from moepp_megatron.moepp.config import MoEPPTransformerConfig


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, *, bf16: bool = False, deterministic: bool = False
) -> TransformerConfig:
    """The one place that maps our config tree onto megatron's TransformerConfig."""
    moe = model.moe
    fused_kernels = transformer_engine_available()
    common = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        kv_channels=model.head_dim,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        # LLaMA backbone: RMSNorm, SwiGLU, no biases, no dropout.
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        # Fused kernels come from TE/apex; the CPU path uses the unfused torch ops.
        bias_activation_fusion=False,
        bias_dropout_fusion=fused_kernels,
        masked_softmax_fusion=fused_kernels,
        apply_rope_fusion=fused_kernels,
        gradient_accumulation_fusion=fused_kernels,
        persist_layer_norm=False,
        bf16=bf16,
        # Deterministic kernels where megatron has a choice (embedding backward, TE attention).
        deterministic_mode=deterministic,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
        expert_model_parallel_size=parallel.expert,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=parallel.cpu_mode,
        recompute_granularity=parallel.recompute,
        recompute_method="uniform" if parallel.recompute == "full" else None,
        recompute_num_layers=1 if parallel.recompute == "full" else None,
        recompute_modules=list(parallel.recompute_modules),
        # Experts.
        num_moe_experts=moe.num_ffn_experts,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_topk=moe.topk,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_grouped_gemm=grouped_gemm_backend(moe.grouped_gemm, fused_kernels, bf16) is not None,
        moe_layer_freq=moe.layer_freq,
    )
    if moe.method == "vanilla":
        return TransformerConfig(
            **common,
            moe_expert_capacity_factor=moe.capacity_factor,
            # megatron's default (top-k, then softmax over the k) needs pre-softmax at k=1.
            moe_router_pre_softmax=moe.topk == 1,
        )
    # The router residual rides along the activations between pipeline stages, so the
    # p2p tensors are wider than hidden_size: let the schedules exchange shapes.
    carries_residual = moe.gating_residual and parallel.pipeline > 1
    return MoEPPTransformerConfig(
        **common,
        variable_seq_lengths=carries_residual,
        # MoE++ takes the softmax over all N experts before top-k (as pre-softmax does).
        moe_router_pre_softmax=True,
        moepp_num_zero_experts=moe.num_zero_experts,
        moepp_num_copy_experts=moe.num_copy_experts,
        moepp_num_constant_experts=moe.num_constant_experts,
        moepp_tau=moe.tau,
        moepp_router=moe.router,
        moepp_routing=moe.routing,
        moepp_gating_residual=moe.gating_residual,
        moepp_capacity_factor=moe.capacity_factor,
        moepp_compile=(
            moe.compile_routing
            if moe.compile_routing is not None
            else torch.cuda.is_available() and not parallel.cpu_mode
        ),
    )


class ModelChunks(torch.nn.ModuleList):
    """This rank's model chunks, one per virtual pipeline stage, checkpointed as one model.

    Sharded tensor keys are global (layer offsets included), so a checkpoint loads under
    any pipeline layout; the ``model{i}`` nesting only routes each chunk's share.
    """

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs) -> dict:
        return {f"model{i}": chunk.sharded_state_dict(prefix, *args, **kwargs) for i, chunk in enumerate(self)}

    def load_state_dict(self, state_dict, strict: bool = True):
        for i, chunk in enumerate(self):
            chunk.load_state_dict(state_dict[f"model{i}"], strict=strict)


def build_model(
    model: ModelConfig, parallel: ParallelConfig, *, bf16: bool = False, deterministic: bool = False
) -> ModelChunks:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving).

    Needs megatron's parallel state (``initialize_parallel``) for the pipeline position.
    """
    config = transformer_config(model, parallel, bf16=bf16, deterministic=deterministic)
    use_te = transformer_engine_available()
    num_chunks = parallel.virtual_pipeline or 1
    chunks = []
    for vp_stage in range(num_chunks) if num_chunks > 1 else [None]:
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(config, use_te, vp_stage=vp_stage),
            vocab_size=model.vocab_size,
            max_sequence_length=model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=int(model.rope_base),
            vp_stage=vp_stage,
        )
        _mark_residual_boundaries(gpt)
        chunks.append(gpt)
    return ModelChunks(chunks)


def _mark_residual_boundaries(gpt: GPTModel) -> None:
    """The chunk's first layer receives the router residual from the previous stage, its
    last sends it on (see moepp.transformer_layer)."""
    config = gpt.config
    if not (isinstance(config, MoEPPTransformerConfig) and config.moepp_gating_residual):
        return
    layers = gpt.decoder.layers
    if len(layers) == 0:
        raise ValueError("a pipeline stage without layers cannot carry the MoE++ gating residual")
    layers[0].receives_residual = not gpt.pre_process
    layers[-1].sends_residual = not gpt.post_process
