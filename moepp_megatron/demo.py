"""The embedded default job: a tiny MoE++ model trained for a few steps with expert
parallelism, on CPU, on synthetic data. It exercises the real path (megatron GPTModel
with MoE++ layers, the alltoall dispatcher across 2 ranks, DDP, the megatron optimizer
and pipeline schedule) and prints the loss, load-balance losses and routing statistics.

    moepp-demo                      # 2 processes, configs/tiny-cpu.yaml
    moepp-demo --steps 50 model.moe.tau=0.5

Run outside torchrun, it launches itself on ``--nproc`` local processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2, help="processes to launch (outside torchrun)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        _launch_local(args.nproc, argv)
        return
    run(args)


def _launch_local(nproc: int, argv) -> None:
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "moepp_megatron.demo", *argv])


def synthetic_batches(vocab_size: int, batch: int, seq: int, seed: int):
    """Sequences counting up with a per-sequence stride: learnable, so the loss falls."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab_size, (batch, 1), generator=generator)
        stride = torch.randint(1, 4, (batch, 1), generator=generator)
        tokens = (start + stride * torch.arange(seq + 1)) % vocab_size
        yield dict(
            tokens=tokens[:, :-1],
            labels=tokens[:, 1:],
            loss_mask=torch.ones(batch, seq),
            position_ids=torch.arange(seq).expand(batch, -1),
        )


def run(args) -> None:
    # megatron warns on import about optional GPU libraries; irrelevant for this CPU demo.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|deprecated).*")
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    from moepp_megatron.config import load_config
    from moepp_megatron.model.builder import build_model
    from moepp_megatron.moepp.statistics import collect_routing_statistics
    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from moepp_megatron.training.forward_step import gpt_forward_step

    config = load_config(args.config, args.overrides)
    parallel = config.parallel
    initialize_parallel(
        tensor_parallel=parallel.tensor,
        pipeline_parallel=parallel.pipeline,
        expert_parallel=parallel.expert,
        seed=config.seed,
        cpu_mode=parallel.cpu_mode,
    )
    rank = torch.distributed.get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    gpt = build_model(config.model, parallel)
    if not parallel.cpu_mode:
        gpt.cuda()
    ddp = DistributedDataParallel(gpt.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt)
    gpt.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.1, clip_grad=1.0), [ddp]
    )
    num_params = sum(p.numel() for p in gpt.parameters())
    say(f"MoE++ demo: {torch.distributed.get_world_size()} ranks, EP={parallel.expert}, "
        f"{num_params:,} parameters on rank 0, {args.steps} steps")

    data = synthetic_batches(
        config.model.vocab_size, args.micro_batch_size, config.model.seq_length,
        seed=config.seed + parallel_state.get_data_parallel_rank(),
    )
    dp_group = parallel_state.get_data_parallel_group()
    for step in range(1, args.steps + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=data, model=[ddp],
            num_microbatches=1, seq_length=config.model.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        loss = torch.stack([item["lm loss"] for item in losses]).mean()
        torch.distributed.all_reduce(loss, group=dp_group)
        loss /= dp_group.size()
        reduce_aux_losses_tracker_across_ranks()
        lb = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].tolist()
        clear_aux_losses_tracker()
        say(f"step {step:3d}  lm loss {loss.item():.4f}  grad norm {grad_norm:.3f}  "
            f"load-balance loss per layer {[round(v, 4) for v in lb]}")
    for stats in collect_routing_statistics(gpt, reduce_group=dp_group):
        zc = ", ".join(f"{kind} {share:.1%}" for kind, share in stats.zc_share.items())
        say(f"layer {stats.layer}: {stats.ffn_experts_per_token:.2f} FFN experts/token, "
            f"ZC slots: {zc}, FFN load max/mean {stats.ffn_load_imbalance:.2f}, "
            f"dropped {stats.dropped_fraction:.1%}")
    destroy_parallel()


if __name__ == "__main__":
    main()
