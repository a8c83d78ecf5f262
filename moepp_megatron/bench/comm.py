"""Communication benchmark: bytes the alltoall dispatcher moves per step, MoE++ vs vanilla.

EP ranks (gloo on CPU, one process each) run one expert layer forward and backward on
their own tokens under the balanced routing at each tau (vanilla: uniform), and count the
payload of every ``all_to_all_single``: dispatch (hidden states, then their gates) and
combine in the forward, and the same in reverse in the backward. ZC experts run locally,
so MoE++ moves FFN-share times vanilla's bytes: tau * N_ffn / (tau * N_ffn + N_zc).
Bytes depend on shapes, dtype and routing, not on the device, so CPU numbers hold on GPU
(in bf16 the hidden-state rows are half as large).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from moepp_megatron.bench import expert_layer
from moepp_megatron.bench.distributions import forced_routing, ideal_speedup
from moepp_megatron.bench.launch import launch


@contextlib.contextmanager
def counting_all_to_all(counts: dict):
    """Adds every all_to_all_single's payload to ``counts``: all bytes, and the bytes that
    leave this rank (the own-rank split stays local)."""
    original = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        rows = input.shape[0]
        world = dist.get_world_size(group)
        splits = list(input_split_sizes) if input_split_sizes is not None else [rows // world] * world
        row_bytes = input[0].numel() * input.element_size() if rows else 0
        counts["bytes"] += rows * row_bytes
        counts["remote_bytes"] += (rows - int(splits[dist.get_rank(group)])) * row_bytes
        counts["calls"] += 1
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counted
    try:
        yield
    finally:
        dist.all_to_all_single = original


def _rank_traffic(model, expert_parallel: int, num_tokens: int, taus) -> list[dict]:
    from moepp_megatron.parallel.initialize import initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(expert_parallel=expert_parallel, cpu_mode=True)
    device = torch.device("cpu")
    rank = dist.get_rank()
    x_SBD = expert_layer.layer_input(model, num_tokens, device, seed=rank)
    cases = [("vanilla", model.moe.tau)] + [("moepp", tau) for tau in taus]
    rows = []
    for method, tau in cases:
        case_model = expert_layer.with_moe(model, method=method, tau=tau)
        torch.manual_seed(0)
        layer = expert_layer.build_expert_layer(case_model, device)
        picks = expert_layer.balanced_picks(case_model, num_tokens)
        forward, backward = (dict(bytes=0, remote_bytes=0, calls=0) for _ in range(2))
        x = x_SBD.detach().requires_grad_()
        with forced_routing(layer.router, picks):
            with counting_all_to_all(forward):
                out = expert_layer.run_layer(layer, x)
            with counting_all_to_all(backward):
                out.backward(torch.ones_like(out))
        ffn = int((picks < case_model.moe.num_ffn_experts).sum())
        rows.append(dict(
            method=method, tau=tau if method == "moepp" else None, ffn_assignments=ffn,
            forward=forward, backward=backward,
        ))
    return rows


def bench(model, expert_parallel: int, num_tokens: int, taus) -> list[dict]:
    """Per case: bytes per rank and step (mean over ranks) and the ratio to vanilla."""
    per_rank = launch(_rank_traffic, expert_parallel, model, expert_parallel, num_tokens, taus)
    moe = model.moe
    rows = []
    for i, case in enumerate(per_rank[0]):
        def mean(phase, key):
            return sum(r[i][phase][key] for r in per_rank) / expert_parallel

        rows.append({
            "expert_parallel": expert_parallel, "tokens_per_rank": num_tokens,
            "method": case["method"], "tau": case["tau"],
            "ffn_share": case["ffn_assignments"] / (num_tokens * moe.topk),
            "ffn_share_formula": 1 / ideal_speedup(moe.num_ffn_experts, moe.num_zc_experts, case["tau"])
            if case["method"] == "moepp" else 1.0,
            "bytes_per_rank": {phase: mean(phase, "bytes") for phase in ("forward", "backward")},
            "remote_bytes_per_rank": {phase: mean(phase, "remote_bytes") for phase in ("forward", "backward")},
        })
    vanilla = rows[0]
    for row in rows:
        step = sum(row["bytes_per_rank"].values())
        row["bytes_per_step_per_rank"] = step
        row["ratio_to_vanilla"] = step / sum(vanilla["bytes_per_rank"].values())
        row["remote_ratio_to_vanilla"] = sum(row["remote_bytes_per_rank"].values()) / sum(
            vanilla["remote_bytes_per_rank"].values()
        )
        tau = "-" if row["tau"] is None else f"{row['tau']:.2f}"
        print(
            f"EP={expert_parallel} {row['method']:>7} tau {tau:>4}: {step / 2**20:8.2f} MiB/rank/step, "
            f"ratio {row['ratio_to_vanilla']:.3f} (FFN share {row['ffn_share']:.3f})",
            flush=True,
        )
    return rows
