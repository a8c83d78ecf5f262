"""The Hugging Face MoE++ model (model_type "MoE++", or "moepp-megatron" beyond the released
format). The two modules are self-contained: the converter copies them next to every exported
checkpoint for ``trust_remote_code=True``."""
