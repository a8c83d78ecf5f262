"""Rank functions for multi-process tests: one training step through megatron's real
DDP, pipeline schedule and finalize_model_grads, with weights and gradients moved
between layouts through dist_checkpointing (megatron's own resharding)."""

from __future__ import annotations

import torch

from moepp_megatron.config.schema import ModelConfig, ParallelConfig


def setup(model_cfg: ModelConfig, parallel: ParallelConfig, seed: int = 0, bf16: bool = False) -> list:
    """This rank's model chunks (one per virtual pipeline stage), bf16 parameters if asked."""
    from moepp_megatron.model.builder import build_model
    from moepp_megatron.parallel.initialize import initialize_parallel

    initialize_parallel(
        tensor_parallel=parallel.tensor,
        pipeline_parallel=parallel.pipeline,
        expert_parallel=parallel.expert,
        virtual_pipeline_parallel=parallel.virtual_pipeline,
        seed=seed,
        cpu_mode=True,
    )
    return build_model(model_cfg, parallel, bf16=bf16)


def save_checkpoint(chunks, directory: str) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(chunks.sharded_state_dict(), directory)


def load_checkpoint(chunks, directory: str) -> None:
    from megatron.core import dist_checkpointing

    chunks.load_state_dict(dist_checkpointing.load(chunks.sharded_state_dict(), directory))


def microbatches(vocab_size: int, count: int, batch: int, seq: int, seed: int = 7) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=generator)
        out.append(
            dict(
                tokens=tokens[:, :-1],
                labels=tokens[:, 1:],
                loss_mask=torch.ones(batch, seq),
                position_ids=torch.arange(seq).expand(batch, -1),
            )
        )
    return out


def train_step(chunks: list, batches: list[dict]) -> dict:
    """Forward+backward over this data-parallel rank's share of ``batches``; grads are
    finalised (DP/EP all-reduce, SP layernorm/router reduction, PP embedding sync) into
    ``param.main_grad`` (fp32, also for bf16 models: megatron's DDP reduces in fp32)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from moepp_megatron.moepp.statistics import collect_aux_losses
    from moepp_megatron.training.forward_step import gpt_forward_step
    from moepp_megatron.training.trainer import wrap_for_training

    config = chunks[0].config
    ddps = [wrap_for_training(chunk, cpu_mode=True, bf16=config.bf16) for chunk in chunks]
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = len(batches) // dp_size
    mine = batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    get_moe_layer_wise_logging_tracker().clear()
    for ddp in ddps:
        ddp.zero_grad_buffer()
    # Every chunk reads the micro-batches in step (inner stages ignore the tokens).
    iterators = [iter(mine) for _ in ddps]
    losses = get_forward_backward_func()(
        forward_step_func=gpt_forward_step,
        data_iterator=iterators if len(ddps) > 1 else iterators[0],
        model=ddps,
        num_microbatches=per_rank,
        seq_length=mine[0]["tokens"].shape[1],
        micro_batch_size=mine[0]["tokens"].shape[0],
        forward_only=False,
    )
    lb = torch.tensor(collect_aux_losses(config)["load_balancing_loss"]) / per_rank
    return {
        "losses": torch.stack([item["lm loss"] for item in losses]) if losses else None,
        "dp_rank": dp_rank,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "lb_loss": lb,
    }


def grads_into_params(chunks: list) -> None:
    """Overwrite every parameter with its finalised gradient, so a checkpoint of the
    model is a checkpoint of the gradients (and reshards like one)."""
    with torch.no_grad():
        for param in (p for chunk in chunks for p in chunk.parameters()):
            param.copy_(param.main_grad)


def full_state(chunks: list) -> dict:
    """The single-process model's state (one chunk holds everything)."""
    (gpt,) = chunks
    return {k: v.detach().clone() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
