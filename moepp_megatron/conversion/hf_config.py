"""Our ``ModelConfig`` <-> the Hugging Face ``config.json`` of MoE++.

A model that the released MoE++ code computes exactly (MoE++ with the release routing, 2
constant + 1 copy + 1 zero expert, top-2, gating residuals, MoE layers where the released
``moe_expert_interval`` puts them, dense layers of ``intermediate_size``) is written with
exactly the released field set and model_type "MoE++". Anything else has model_type
"moepp-megatron" and adds the ``moepp_*`` fields of ``moepp_megatron/hf/configuration_moepp.py``,
each only where it differs from the released family's value (the class defaults): the released
code would ignore those fields and compute another model, and a type of its own keeps it from
being used. Training-only ``moepp_*`` records (tau, beta, gamma) go with either type.

The embedding keeps megatron's padded vocabulary (``vocab_size`` = padded size): logits equal
megatron's bit for bit and the padded rows survive a round trip. A dense FFN size that no layer
uses is not exported.
"""

from __future__ import annotations

import torch

from moepp_megatron.config.schema import ModelConfig, MoEConfig

# The two model types of moepp_megatron/hf/configuration_moepp.py (which imports transformers).
MODEL_TYPE = "MoE++"
EXTENDED_MODEL_TYPE = "moepp-megatron"
_CLASS_PREFIX = {MODEL_TYPE: "MoEPP", EXTENDED_MODEL_TYPE: "MoEPPMegatron"}


def auto_map(model_type: str) -> dict[str, str]:
    """The code files' classes for ``model_type``."""
    prefix = _CLASS_PREFIX[model_type]
    return {
        "AutoConfig": f"configuration_moepp.{prefix}Config",
        "AutoModel": f"modeling_moepp.{prefix}Model",
        "AutoModelForCausalLM": f"modeling_moepp.{prefix}ForCausalLM",
    }


def moe_layer_flags(model: ModelConfig) -> list[int]:
    """Per layer 1 (expert layer) or 0 (dense), megatron's reading of ``layer_freq`` (an int N:
    layer i is an expert layer iff i % N == 0)."""
    freq = model.moe.layer_freq
    if isinstance(freq, list):
        if len(freq) != model.num_layers:
            raise ValueError(f"model.moe.layer_freq has {len(freq)} entries for {model.num_layers} layers")
        return [int(bool(f)) for f in freq]
    return [int(i % freq == 0) for i in range(model.num_layers)]


def released_interval(flags: list[int]) -> int | None:
    """The released ``moe_expert_interval`` that gives exactly these MoE layers, if one does
    (megatron's ``layer_freq: N`` > 1 starts at layer 0, the released interval at layer N - 1)."""
    from moepp_megatron.hf.configuration_moepp import interval_moe_layers

    return next((k for k in range(1, len(flags) + 1) if interval_moe_layers(k, len(flags)) == flags), None)


def to_hf_config(
    model: ModelConfig, *, torch_dtype: str, bos_token_id=None, eos_token_id=None, pad_token_id=None
) -> dict:
    """config.json for ``model`` (whose ``vocab_size`` is megatron's padded vocabulary);
    ``pad_token_id`` is written only when there is one."""
    from moepp_megatron.hf.configuration_moepp import RELEASED_ARCHITECTURE, TRAINING_DEFAULTS

    moe = model.moe
    vanilla = moe.method == "vanilla"
    num_zc = 0 if vanilla else moe.num_zc_experts
    flags = moe_layer_flags(model)
    interval = released_interval(flags)
    has_dense = not all(flags)
    extras = {
        "moepp_method": moe.method,
        "moepp_num_constant_experts": 0 if vanilla else moe.num_constant_experts,
        "moepp_num_copy_experts": 0 if vanilla else moe.num_copy_experts,
        "moepp_num_zero_experts": 0 if vanilla else moe.num_zero_experts,
        "moepp_topk": moe.topk,
        "moepp_routing": "paper" if vanilla else moe.routing,
        "moepp_gating_residual": not vanilla and moe.gating_residual,
        "moepp_moe_layers": None if interval else flags,
        "moepp_dense_intermediate_size": (
            model.ffn_hidden_size if has_dense and model.ffn_hidden_size != moe.ffn_hidden_size else None
        ),
        "moepp_capacity_factor": moe.capacity_factor,
        "moepp_tau": moe.tau,
        "moepp_aux_loss_coeff": moe.aux_loss_coeff,
        "moepp_z_loss_coeff": moe.z_loss_coeff,
    }
    defaults = {**RELEASED_ARCHITECTURE, **TRAINING_DEFAULTS}
    extras = {k: v for k, v in extras.items() if v != defaults[k]}
    own_head_dim = model.head_dim * model.num_attention_heads != model.hidden_size
    released = not own_head_dim and not any(k in RELEASED_ARCHITECTURE for k in extras)
    model_type = MODEL_TYPE if released else EXTENDED_MODEL_TYPE
    config = {
        "architectures": [f"{_CLASS_PREFIX[model_type]}ForCausalLM"],
        "auto_map": auto_map(model_type),
        "model_type": model_type,
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
        "moe_expert_interval": interval,
        "moe_use_mixtral_gating": False,
        "moe_2layer_gate": not vanilla and moe.router == "mlp",
        "moe_use_logits_norm": False,
        "moe_gate_norm_std": 1.0,
        "moe_feature_no_mul_topk": vanilla or moe.routing == "paper",
    }
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    if own_head_dim:
        config["head_dim"] = model.head_dim
    return {**config, **extras}


def is_release_format(config: dict) -> bool:
    """True for model_type "MoE++": the released field set, which the released code computes."""
    return config.get("model_type") == MODEL_TYPE


def from_hf_config(config: dict) -> ModelConfig:
    """Our model config for a Hugging Face MoE++ config.json (model_type "MoE++", ours or the
    released one, or "moepp-megatron").

    Fields the HF config does not carry take the values of the released 7B run
    (``configs/moepp-7b-16+4e.yaml``): tau 0.75, beta 0.01, gamma 1.1, alltoall dispatcher.
    """
    hf = hf_config_object(config)
    vanilla = hf.is_vanilla
    flags = [int(hf.is_moe_layer(i)) for i in range(hf.num_hidden_layers)]
    layer_freq: int | list[int] = 1 if all(flags) else flags
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
    """The ``MoEPPConfig`` (or ``MoEPPMegatronConfig``, by model_type) of a config.json dict;
    an unknown model_type or invalid fields raise ValueError."""
    from moepp_megatron.hf.configuration_moepp import MoEPPConfig, MoEPPMegatronConfig

    classes = {cls.model_type: cls for cls in (MoEPPConfig, MoEPPMegatronConfig)}
    model_type = config.get("model_type")
    if model_type not in classes:
        raise ValueError(f"config.json: model_type {model_type!r} is not one of {sorted(classes)}")
    fields = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "model_type")}
    try:
        return classes[model_type](**fields)
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
