"""Conversion between megatron and Hugging Face (model_type "MoE++") weight layouts."""
