"""Expert-layer benchmark: one MoE++ layer against one vanilla MoE layer.

For each model shape and routing distribution, both layers get the same input (same
token count) and are timed forward alone (the paper's "expert forward time") and
forward+backward; the numbers are medians over repeats after warm-up.

Distributions: ``router_init`` (whatever the freshly initialised routers pick) and, per
tau, ``balanced`` (MoE++ at the balance of the heterogeneous loss; vanilla uniform over its
FFN experts). The ideal speed-up is vanilla's FFN assignments over MoE++'s, measured
(at balance it is (tau * N_ffn + N_zc) / (tau * N_ffn)); "bound fraction" is the measured
speed-up over it.
"""

from __future__ import annotations

import contextlib

import torch

from moepp_megatron.bench import expert_layer
from moepp_megatron.bench.distributions import forced_routing, ideal_speedup
from moepp_megatron.bench.measure import summarize, time_calls
from moepp_megatron.bench.paper import paper_speedup



def time_layer(layer, x_SBD: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> dict:
    """Forward and forward+backward timings of ``layer`` on ``x_SBD``."""
    x_SBD = x_SBD.detach().requires_grad_()
    grad_SBD = torch.randn_like(x_SBD)

    def forward():
        expert_layer.run_layer(layer, x_SBD)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        x_SBD.grad = None
        expert_layer.run_layer(layer, x_SBD).backward(grad_SBD)

    return {
        "forward": summarize(time_calls(forward, device, warmup, repeats)),
        "forward_backward": summarize(time_calls(forward_backward, device, warmup, repeats)),
    }


def measure_case(model, x_SBD, balanced: bool, device, warmup: int, repeats: int) -> dict:
    """One layer, routing either as its fresh router likes or forced to balance."""
    torch.manual_seed(0)
    layer = expert_layer.build_expert_layer(model, device)
    num_tokens = x_SBD.shape[0] * x_SBD.shape[1]
    forcing = contextlib.nullcontext()
    if balanced:
        forcing = forced_routing(layer.router, expert_layer.balanced_picks(model, num_tokens))
    with forcing:
        tokens, ffn = expert_layer.routed_ffn_assignments(layer, x_SBD)
        timings = time_layer(layer, x_SBD, device, warmup, repeats)
    fraction = ffn / (tokens * model.moe.topk)
    return {"tokens": tokens, "ffn_assignments": ffn, "ffn_fraction": fraction, **timings}


def bench_model(
    name: str, overrides: list[str], taus, num_tokens: int, device, warmup: int, repeats: int
) -> list[dict]:
    moepp = expert_layer.preset_model(name, overrides)
    vanilla = expert_layer.with_moe(moepp, method="vanilla")
    x_SBD = expert_layer.layer_input(moepp, num_tokens, device)
    moe = moepp.moe
    baselines = {
        "router_init": measure_case(vanilla, x_SBD, False, device, warmup, repeats),
        "balanced": measure_case(vanilla, x_SBD, True, device, warmup, repeats),
    }
    cases = [("router_init", moe.tau)] + [("balanced", tau) for tau in taus]
    rows = []
    for distribution, tau in cases:
        balanced = distribution == "balanced"
        ours = measure_case(expert_layer.with_moe(moepp, tau=tau), x_SBD, balanced, device, warmup, repeats)
        base = baselines[distribution]
        ideal = base["ffn_assignments"] / max(ours["ffn_assignments"], 1)
        speedup = {
            phase: base[phase]["median_ms"] / ours[phase]["median_ms"]
            for phase in ("forward", "forward_backward")
        }
        paper = paper_speedup(name, tau) if balanced else None
        paper_ideal = ideal_speedup(moe.num_ffn_experts, moe.num_zc_experts, tau) if balanced else None
        rows.append({
            "model": name,
            "hidden_size": moepp.hidden_size,
            "ffn_hidden_size": moe.ffn_hidden_size,
            "num_ffn_experts": moe.num_ffn_experts,
            "num_zc_experts": moe.num_zc_experts,
            "distribution": distribution,
            "tau": tau,
            "moepp": ours,
            "vanilla": base,
            "speedup": speedup,
            "ideal_speedup": ideal,
            "ideal_speedup_formula": paper_ideal,
            "bound_fraction": {phase: s / ideal for phase, s in speedup.items()},
            "paper_speedup": paper,
            "paper_bound_fraction": paper / paper_ideal if paper and paper_ideal else None,
        })
        print(_summary_line(rows[-1]), flush=True)
    return rows


def _summary_line(row: dict) -> str:
    tau = "init" if row["distribution"] == "router_init" else f"{row['tau']:.2f}"
    paper = f"{row['paper_speedup']:.2f}x" if row["paper_speedup"] else "-"
    return (
        f"{row['model']:>4} tau {tau:>4}: vanilla {row['vanilla']['forward']['median_ms']:8.1f} ms, "
        f"MoE++ {row['moepp']['forward']['median_ms']:8.1f} ms fwd; speed-up fwd "
        f"{row['speedup']['forward']:.2f}x fwd+bwd {row['speedup']['forward_backward']:.2f}x; "
        f"ideal {row['ideal_speedup']:.2f}x; paper {paper}"
    )
