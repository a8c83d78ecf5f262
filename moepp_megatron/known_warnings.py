"""Warnings megatron-core and torch print on every start that say nothing about this run.

Each entry is a message pattern and why it is harmless here. Every command calls
:func:`ignore_known_warnings` first; anything not listed still prints.
"""

from __future__ import annotations

import warnings

KNOWN_WARNINGS = (
    (r".*Transformer Engine and Apex are not installed.*",
     "megatron announces the torch fallbacks (optimizer, multi-tensor ops, grad clipping) it "
     "uses without TE/Apex; they are the code paths CPU mode and the tests run"),
    (r".*Apex is not installed\. Falling back to Torch Norm.*",
     "RMSNorm from torch instead of Apex: the same math, used wherever TE is absent"),
    (r".*full scope is deprecated\. Use empty cuda_graph_scope.*",
     "megatron's TransformerConfig default for CUDA graphs warns about itself; MoE++ runs "
     "never capture CUDA graphs (moepp/config.py rejects them)"),
    # torch 2.13 deprecations hit by megatron-core 0.16.1's own calls: nothing to change on
    # our side until megatron-core moves (0.17+ needs Python 3.12).
    (r".*`torch\.distributed\.all_gather_into_tensor` is deprecated.*",
     "megatron's dispatchers and distributed optimizer call it; the replacement is new in torch"),
    (r".*`load_state_dict` is deprecated and will be removed.*",
     "dist_checkpointing's torch_dist loader calls torch.distributed.checkpoint's old name"),
    (r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
     "dist_checkpointing builds ShardedTensors for the torch_dist format"),
)


def ignore_known_warnings() -> None:
    for pattern, _reason in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
