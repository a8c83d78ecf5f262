"""Overhead benchmark: the share of an MoE++ layer's time spent outside the FFN experts.

"Routing" is the whole MoE++ router (gating GEMMs, softmax, top-k, gates, capacity, the
load-balance loss and counters); "ZC" the zero-computation experts. Each is timed on its
own with the layer's inputs, forward and forward+backward, under the balanced routing at
tau 0.75, once eager and once with ``model.moe.compile_routing`` (torch.compile). Vanilla's
stock router is timed the same way for comparison.
"""

from __future__ import annotations

import torch

from moepp_megatron.bench import expert_layer
from moepp_megatron.bench.distributions import forced_routing
from moepp_megatron.bench.layer import time_layer
from moepp_megatron.bench.measure import summarize, time_calls

TAU = 0.75


def _time_pair(forward, backward_of, device, warmup: int, repeats: int) -> dict:
    def forward_backward():
        backward_of(forward())

    return {
        "forward": summarize(time_calls(forward, device, warmup, repeats)),
        "forward_backward": summarize(time_calls(forward_backward, device, warmup, repeats)),
    }


def time_router(layer, x_SBD, device, warmup: int, repeats: int) -> dict:
    x_SBD = x_SBD.detach().requires_grad_()
    gates_TN = layer.router(x_SBD)[0]
    grad_TN = torch.randn_like(gates_TN)
    return _time_pair(lambda: layer.router(x_SBD)[0], lambda g: g.backward(grad_TN), device, warmup, repeats)


def time_zc_experts(layer, x_SBD, device, warmup: int, repeats: int) -> dict:
    x_TD = x_SBD.detach().reshape(-1, x_SBD.shape[-1]).requires_grad_()
    with torch.no_grad():
        gates_TN = layer.router(x_SBD)[0]
    gates_TZ = gates_TN[:, layer.config.num_moe_experts :].detach().requires_grad_()
    grad_TD = torch.randn_like(x_TD)
    return _time_pair(
        lambda: layer.zc_experts(x_TD, gates_TZ), lambda out: out.backward(grad_TD), device, warmup, repeats
    )


def _share(parts: list[dict], whole: dict) -> dict:
    return {
        phase: sum(p[phase]["median_ms"] for p in parts) / whole[phase]["median_ms"]
        for phase in ("forward", "forward_backward")
    }


def bench_model(
    name: str, overrides: list[str], compile_modes, num_tokens: int, device, warmup: int, repeats: int
) -> list[dict]:
    moepp = expert_layer.with_moe(expert_layer.preset_model(name, overrides), tau=TAU)
    x_SBD = expert_layer.layer_input(moepp, num_tokens, device)
    rows = []
    for method, compile_routing in [("vanilla", False)] + [("moepp", mode) for mode in compile_modes]:
        model = expert_layer.with_moe(moepp, method=method, compile_routing=compile_routing)
        torch.manual_seed(0)
        layer = expert_layer.build_expert_layer(model, device)
        with forced_routing(layer.router, expert_layer.balanced_picks(model, num_tokens)):
            timings = {
                "layer": time_layer(layer, x_SBD, device, warmup, repeats),
                "router": time_router(layer, x_SBD, device, warmup, repeats),
            }
            if method == "moepp":
                timings["zc_experts"] = time_zc_experts(layer, x_SBD, device, warmup, repeats)
        parts = [timings["router"]] + ([timings["zc_experts"]] if method == "moepp" else [])
        rows.append({
            "model": name, "method": method, "compile_routing": compile_routing, "tau": TAU,
            "tokens": num_tokens, **timings, "share": _share(parts, timings["layer"]),
        })
        share = rows[-1]["share"]
        print(
            f"{name:>4} {method:>7} compile={compile_routing!s:5}: routing+ZC share "
            f"fwd {share['forward']:.1%} fwd+bwd {share['forward_backward']:.1%} "
            f"(layer fwd {timings['layer']['forward']['median_ms']:.1f} ms)",
            flush=True,
        )
    return rows
