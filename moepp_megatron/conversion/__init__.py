"""Conversion between megatron dist checkpoints and the Hugging Face MoE++ format
(model_type "MoE++", or "moepp-megatron" beyond the released format), both ways:
``moepp-convert`` (cli.py).

- ``hf_names``: the weight-name table (megatron full state dict <-> HF tensors)
- ``hf_config``: our ``ModelConfig`` <-> config.json (the released field set and type when it fits)
- ``megatron_checkpoint``: read / write dist checkpoints in one process, any layout
- ``hf_files``: sharded safetensors, index, config and code files
- ``tokenizer``: the run's sentencepiece model as an offline HF tokenizer
- ``to_hf`` / ``from_hf``: the two directions
"""
