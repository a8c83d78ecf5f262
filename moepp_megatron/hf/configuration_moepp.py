"""Hugging Face configuration of MoE++: model_type "MoE++" (the released format) and
"moepp-megatron" (the released format plus what it cannot express).

Self-contained (imports only transformers): this file is copied next to converted
checkpoints and loaded with ``trust_remote_code=True``.

The released MoE++-7B config fields are kept with their meaning (LLaMA fields plus
``num_experts`` = [N_ffn + N_zc], ``moe_expert_interval`` (layer i is an MoE layer iff
``(i + 1) % moe_expert_interval == 0``, as the released code reads it),
``moe_use_mixtral_gating``, ``moe_2layer_gate``, ``moe_use_logits_norm``,
``moe_gate_norm_std``, ``moe_feature_no_mul_topk``). The ``moepp_*`` fields of
``RELEASED_ARCHITECTURE`` describe models the released format cannot express; their defaults
are the released family (2 constant + 1 copy + 1 zero expert, top-2, "release" routing, gating
residuals on):

- ``moepp_method``: "moepp", or "vanilla" for a plain MoE baseline (no ZC experts, linear
  router, no gating residual) routed like megatron's ``TopKRouter``: top-k of the logits,
  then a softmax over those k (at k = 1: softmax over all experts, then top-1).
- ``moepp_num_{constant,copy,zero}_experts``: the ZC experts, after the FFN experts in this
  order. ``moepp_topk``: experts per token.
- ``moepp_routing``: "release" (zero-expert gates dropped, the other picks renormalised,
  experts see ``topk * x``; ``moe_feature_no_mul_topk`` false) or "paper" (gates are the
  softmax probabilities, experts see ``x``; ``moe_feature_no_mul_topk`` true).
- ``moepp_gating_residual``: G^j = R^j(x) + W_g G^{j-1}; ``gate_map`` exists either way.
- ``moepp_moe_layers``: per layer 1 (MoE) or 0 (dense SwiGLU of size
  ``moepp_dense_intermediate_size``, default ``intermediate_size``), for layer patterns that
  no ``moe_expert_interval`` gives (``moe_expert_interval`` is then null).

The released code knows none of these fields: given one, it would ignore it and compute
another model. So ``MoEPPConfig`` (model_type "MoE++") refuses them, as it refuses a
``head_dim`` other than hidden_size / num_attention_heads, and ``MoEPPMegatronConfig``
(model_type "moepp-megatron", a type the released code does not register) takes them.

Training-only fields, recorded so a converted model continues pretraining unchanged and
ignored here (either type): ``moepp_capacity_factor`` (gamma of Eq. 8), ``moepp_tau``,
``moepp_aux_loss_coeff``, ``moepp_z_loss_coeff``. Inference is dropless, as in the released
code: a non-null capacity factor does not drop tokens here.
"""

from __future__ import annotations

from transformers import PretrainedConfig

RELEASED_MODEL_TYPE = "MoE++"
EXTENDED_MODEL_TYPE = "moepp-megatron"
# The fields that change what the model computes, at the released family's values.
RELEASED_ARCHITECTURE = {
    "moepp_method": "moepp",
    "moepp_num_constant_experts": 2,
    "moepp_num_copy_experts": 1,
    "moepp_num_zero_experts": 1,
    "moepp_topk": 2,
    "moepp_routing": "release",
    "moepp_gating_residual": True,
    "moepp_moe_layers": None,
    "moepp_dense_intermediate_size": None,
}
# Training-only records, at the values of the released 7B run.
TRAINING_DEFAULTS = {
    "moepp_capacity_factor": 1.1,
    "moepp_tau": 0.75,
    "moepp_aux_loss_coeff": 0.01,
    "moepp_z_loss_coeff": None,
}


def interval_moe_layers(interval: int, num_layers: int) -> list[int]:
    """Per layer 1 (MoE) or 0 (dense) for the released ``moe_expert_interval``."""
    return [int((i + 1) % interval == 0) for i in range(num_layers)]


class MoEPPConfig(PretrainedConfig):
    """model_type "MoE++": what the released MoE++ code computes, and nothing else."""

    model_type = RELEASED_MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1536,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        num_experts: list[int] | None = None,
        moe_expert_interval: int | None = 1,
        moe_use_mixtral_gating: bool = False,
        moe_2layer_gate: bool = True,
        moe_use_logits_norm: bool = False,
        moe_gate_norm_std: float = 1.0,
        moe_feature_no_mul_topk: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        if num_experts is None:
            num_experts = [16 + 4]  # MoE++-7B: 16 FFN experts, 2 constant + 1 copy + 1 zero
        self.num_experts = list(num_experts) if isinstance(num_experts, (list, tuple)) else num_experts
        self.moe_expert_interval = moe_expert_interval
        self.moe_use_mixtral_gating = moe_use_mixtral_gating
        self.moe_2layer_gate = moe_2layer_gate
        self.moe_use_logits_norm = moe_use_logits_norm
        self.moe_gate_norm_std = moe_gate_norm_std
        self.moe_feature_no_mul_topk = moe_feature_no_mul_topk
        for name, default in {**RELEASED_ARCHITECTURE, **TRAINING_DEFAULTS}.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.moepp_moe_layers is not None:
            self.moepp_moe_layers = list(self.moepp_moe_layers)
        self._validate(rope_scaling)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ---------------------------------------------------------------- derived sizes

    @property
    def is_vanilla(self) -> bool:
        return self.moepp_method == "vanilla"

    @property
    def num_zc_experts(self) -> int:
        if self.is_vanilla:
            return 0
        return self.moepp_num_constant_experts + self.moepp_num_copy_experts + self.moepp_num_zero_experts

    @property
    def num_router_experts(self) -> int:
        """N = N_ffn + N_zc: the router's width."""
        return self.num_experts[0]

    @property
    def num_ffn_experts(self) -> int:
        return self.num_router_experts - self.num_zc_experts

    @property
    def dense_intermediate_size(self) -> int:
        return self.moepp_dense_intermediate_size or self.intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        if self.moepp_moe_layers is not None:
            return bool(self.moepp_moe_layers[layer])
        return bool(interval_moe_layers(self.moe_expert_interval, self.num_hidden_layers)[layer])

    def extended_fields(self) -> list[str]:
        """The fields whose values the released MoE++ code would not compute."""
        names = [name for name, value in RELEASED_ARCHITECTURE.items() if getattr(self, name) != value]
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            names.append("head_dim")  # not a released field: hidden_size / num_attention_heads there
        return names

    # ---------------------------------------------------------------- validation

    def _validate(self, rope_scaling) -> None:
        """Refuse what this implementation does not compute, naming the field."""

        def fail(name: str, message: str) -> None:
            raise ValueError(f"MoE++ config: {name}={getattr(self, name, None)!r} {message}")

        if rope_scaling is not None:
            raise ValueError(f"MoE++ config: rope_scaling={rope_scaling!r} is not supported (only plain RoPE)")
        if self.hidden_act != "silu":
            fail("hidden_act", "must be 'silu' (SwiGLU experts)")
        if self.attention_bias:
            fail("attention_bias", "must be false")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if not (isinstance(self.num_experts, list) and len(self.num_experts) == 1):
            fail("num_experts", "must be a one-element list [N_ffn + N_zc]")
        for name in ("moe_use_mixtral_gating", "moe_use_logits_norm"):
            if getattr(self, name):
                fail(name, "is not supported (false in the released MoE++ models)")
        if self.moepp_method not in ("moepp", "vanilla"):
            fail("moepp_method", "must be 'moepp' or 'vanilla'")
        if self.moepp_routing not in ("paper", "release"):
            fail("moepp_routing", "must be 'paper' or 'release'")
        for name in ("moepp_num_constant_experts", "moepp_num_copy_experts", "moepp_num_zero_experts"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.num_ffn_experts < 1:
            fail("num_experts", f"leaves no FFN expert beside {self.num_zc_experts} ZC experts")
        if not 1 <= self.moepp_topk <= self.num_router_experts:
            fail("moepp_topk", f"must be in [1, {self.num_router_experts}]")
        interval = self.moe_expert_interval
        if self.moepp_moe_layers is None and not (isinstance(interval, int) and interval >= 1):
            fail("moe_expert_interval", "must be an integer >= 1 (or null beside moepp_moe_layers)")
        if self.moepp_moe_layers is not None and len(self.moepp_moe_layers) != self.num_hidden_layers:
            fail("moepp_moe_layers", f"must have num_hidden_layers={self.num_hidden_layers} entries")
        extended = self.extended_fields()
        if extended and type(self).model_type == RELEASED_MODEL_TYPE:
            fail(
                extended[0],
                "is beyond the released MoE++ format (the released code would ignore it and compute another "
                f"model): a config with it has model_type {EXTENDED_MODEL_TYPE!r}",
            )
        if self.is_vanilla:
            if self.moe_2layer_gate:
                fail("moe_2layer_gate", "must be false for a vanilla MoE (linear router)")
            if self.moepp_gating_residual:
                fail("moepp_gating_residual", "must be false for a vanilla MoE")
            if not self.moe_feature_no_mul_topk:
                fail("moe_feature_no_mul_topk", "must be true for a vanilla MoE (experts see x)")
            return
        if self.moe_feature_no_mul_topk != (self.moepp_routing == "paper"):
            fail(
                "moe_feature_no_mul_topk",
                f"must be {self.moepp_routing == 'paper'} with moepp_routing={self.moepp_routing!r} "
                "(the release routing feeds experts topk * x, the paper routing x)",
            )
        if self.moepp_routing == "release" and self.moepp_num_zero_experts != 1:
            fail("moepp_num_zero_experts", "must be 1 with the release routing")


class MoEPPMegatronConfig(MoEPPConfig):
    """model_type "moepp-megatron": the released fields plus the ``moepp_*`` ones. A type of
    its own, so that an environment where "MoE++" means the released code never builds this
    model with it."""

    model_type = EXTENDED_MODEL_TYPE

    def __init__(self, **kwargs) -> None:
        # Without an __init__ of its own, transformers 5 would generate a dataclass one.
        super().__init__(**kwargs)


__all__ = ["MoEPPConfig", "MoEPPMegatronConfig"]
