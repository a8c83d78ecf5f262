"""Our ``ModelConfig`` <-> the Hugging Face ``config.json`` of MoE++ (model_type "MoE++").

A model of the released MoE++-7B family (MoE++ with the 2-layer router, 2 constant + 1 copy
+ 1 zero expert, top-2, "release" routing, gating residuals, every layer an MoE layer) is
written with exactly the released field set. Anything else adds the ``moepp_*`` fields of
``moepp_megatron/hf/configuration_moepp.py``, each only where it differs from the released
family's value (the class defaults), so a released config.json reads back unchanged.

The embedding keeps megatron's padded vocabulary (``vocab_size`` = padded size): logits equal
megatron's bit for bit and the padded rows survive a round trip. A dense FFN size that no layer
uses is not exported.
"""

from __future__ import annotations

import torch

from moepp_megatron.config.schema import ModelConfig, MoEConfig

MODEL_TYPE = "MoE++"
AUTO_MAP = {
    "AutoConfig": "configuration_moepp.MoEPPConfig",
    "AutoModel": "modeling_moepp.MoEPPModel",
    "AutoModelForCausalLM": "modeling_moepp.MoEPPForCausalLM",
}

# Values of the moepp_* fields for the released family (= MoEPPConfig's defaults); a field
# is written only when the model differs.
RELEASE_DEFAULTS = {
    "moepp_method": "moepp",
    "moepp_num_constant_experts": 2,
    "moepp_num_copy_experts": 1,
    "moepp_num_zero_experts": 1,
    "moepp_topk": 2,
    "moepp_routing": "release",
    "moepp_gating_residual": True,
    "moepp_moe_layers": None,
    "moepp_dense_intermediate_size": None,
    "moepp_capacity_factor": 1.1,
    "moepp_tau": 0.75,
    "moepp_aux_loss_coeff": 0.01,
    "moepp_z_loss_coeff": None,
}


def moe_layer_flags(model: ModelConfig) -> list[int]:
    """Per layer 1 (expert layer) or 0 (dense), megatron's reading of ``layer_freq``."""
    freq = model.moe.layer_freq
    if isinstance(freq, list):
        if len(freq) != model.num_layers:
            raise ValueError(f"model.moe.layer_freq has {len(freq)} entries for {model.num_layers} layers")
        return [int(bool(f)) for f in freq]
    return [int(i % freq == 0) for i in range(model.num_layers)]


def to_hf_config(model: ModelConfig, *, torch_dtype: str, bos_token_id=None, eos_token_id=None) -> dict:
    """config.json for ``model`` (whose ``vocab_size`` is megatron's padded vocabulary)."""
    moe = model.moe
    vanilla = moe.method == "vanilla"
    num_zc = 0 if vanilla else moe.num_zc_experts
    flags = moe_layer_flags(model)
    config = {
        "architectures": ["MoEPPForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": MODEL_TYPE,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": moe.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_length,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_base,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype,
        "num_experts": [moe.num_ffn_experts + num_zc],
        "moe_expert_interval": moe.layer_freq if isinstance(moe.layer_freq, int) else 1,
        "moe_use_mixtral_gating": False,
        "moe_2layer_gate": not vanilla and moe.router == "mlp",
        "moe_use_logits_norm": False,
        "moe_gate_norm_std": 1.0,
        "moe_feature_no_mul_topk": vanilla or moe.routing == "paper",
    }
    if model.head_dim * model.num_attention_heads != model.hidden_size:
        config["head_dim"] = model.head_dim
    has_dense = not all(flags)
    extras = {
        "moepp_method": moe.method,
        "moepp_num_constant_experts": 0 if vanilla else moe.num_constant_experts,
        "moepp_num_copy_experts": 0 if vanilla else moe.num_copy_experts,
        "moepp_num_zero_experts": 0 if vanilla else moe.num_zero_experts,
        "moepp_topk": moe.topk,
        "moepp_routing": "paper" if vanilla else moe.routing,
        "moepp_gating_residual": not vanilla and moe.gating_residual,
        "moepp_moe_layers": flags if isinstance(moe.layer_freq, list) else None,
        "moepp_dense_intermediate_size": (
            model.ffn_hidden_size if has_dense and model.ffn_hidden_size != moe.ffn_hidden_size else None
        ),
        "moepp_capacity_factor": moe.capacity_factor,
        "moepp_tau": moe.tau,
        "moepp_aux_loss_coeff": moe.aux_loss_coeff,
        "moepp_z_loss_coeff": moe.z_loss_coeff,
    }
    config.update({k: v for k, v in extras.items() if v != RELEASE_DEFAULTS[k]})
    return config


def is_release_format(config: dict) -> bool:
    """True when ``config`` uses only the released field set (no moepp_* field)."""
    return not any(key.startswith("moepp_") for key in config)


def from_hf_config(config: dict) -> ModelConfig:
    """Our model config for a Hugging Face MoE++ config.json (ours or the released one).

    Fields the HF config does not carry take the values of the released 7B run
    (``configs/moepp-7b-16+4e.yaml``): tau 0.75, beta 0.01, gamma 1.1, alltoall dispatcher.
    """
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"config.json: model_type {model_type!r} is not {MODEL_TYPE!r}")
    hf = hf_config_object(config)
    vanilla = hf.is_vanilla
    if hf.moepp_moe_layers is not None:
        layer_freq: int | list[int] = list(hf.moepp_moe_layers)
    else:
        layer_freq = hf.moe_expert_interval
    moe = MoEConfig(
        method=hf.moepp_method,
        num_ffn_experts=hf.num_ffn_experts,
        ffn_hidden_size=hf.intermediate_size,
        topk=hf.moepp_topk,
        num_zero_experts=0 if vanilla else hf.moepp_num_zero_experts,
        num_copy_experts=0 if vanilla else hf.moepp_num_copy_experts,
        num_constant_experts=0 if vanilla else hf.moepp_num_constant_experts,
        tau=hf.moepp_tau,
        router="mlp" if hf.moe_2layer_gate else "linear",
        routing=hf.moepp_routing,
        gating_residual=hf.moepp_gating_residual,
        capacity_factor=hf.moepp_capacity_factor,
        aux_loss_coeff=hf.moepp_aux_loss_coeff,
        z_loss_coeff=hf.moepp_z_loss_coeff,
        layer_freq=layer_freq,
    )
    return ModelConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        head_dim=hf.head_dim,
        num_query_groups=None if hf.num_key_value_heads == hf.num_attention_heads else hf.num_key_value_heads,
        ffn_hidden_size=hf.dense_intermediate_size,
        seq_length=hf.max_position_embeddings,
        vocab_size=hf.vocab_size,
        rope_base=float(hf.rope_theta),
        norm_eps=hf.rms_norm_eps,
        init_std=hf.initializer_range,
        moe=moe,
    )


def hf_config_object(config: dict):
    """The ``MoEPPConfig`` of a config.json dict; invalid fields raise ValueError."""
    from moepp_megatron.hf.configuration_moepp import MoEPPConfig

    fields = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "model_type")}
    try:
        return MoEPPConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.json: {err}") from err


def expected_hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the HF model that ``config`` describes (built on
    the meta device, so nothing is allocated)."""
    from moepp_megatron.hf.modeling_moepp import MoEPPForCausalLM

    with torch.device("meta"):
        model = MoEPPForCausalLM(hf_config_object(config))
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_weights(state: dict[str, torch.Tensor], config: dict, what: str) -> None:
    """Every HF parameter of the model is present exactly with its shape; nothing else is."""
    expected = expected_hf_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match config.json: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"{what} does not match config.json: tensor {name} has shape {tuple(state[name].shape)}, "
                f"config.json implies {shape}"
            )
