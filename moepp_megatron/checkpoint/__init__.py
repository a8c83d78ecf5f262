"""Checkpoints: megatron dist_checkpointing in Megatron-LM's layout (:mod:`checkpointer`: a
``Checkpointer`` owns the model, optimizer and scheduler it saves and restores), verified
before loading (:mod:`files`). Below both the trainer and the Hugging Face conversion: it
imports neither."""
