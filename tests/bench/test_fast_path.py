"""The fast path computes what the eager path and the plain reference compute.

- compiled routing (``route`` under torch.compile) and compiled ZC experts against the
  eager functions and tests/reference, forward and gradients: routing decisions are
  identical, values agree to float rounding (inductor may reorder a reduction);
- the whole MoE++ layer with ``compile_routing`` against the reference;
- grouped GEMM experts (``TorchGroupedMLP``, torch._grouped_mm) against megatron's
  SequentialMLP with the same weights (moved through dist_checkpointing): to float rounding
  (different GEMM calls, whose blocking may depend on the threads available);
- a static audit that the MoE++ modules contain no host-device synchronisation (on a GPU,
  tests/gpu runs routing and the ZC experts under torch's sync debug mode).
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing

import moepp_megatron.moepp as moepp_package
from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.model import grouped_experts
from moepp_megatron.model.builder import build_model
from moepp_megatron.model.grouped_experts import TorchGroupedMLP, grouped_gemm_backend
from moepp_megatron.moepp.compiled import compiled
from moepp_megatron.moepp.routing import heterogeneous_capacity, route
from moepp_megatron.moepp.zero_computation_experts import ZeroComputationExperts, zc_experts_forward
from tests.moepp.test_layer_vs_reference import build_moepp_layer, run_megatron, run_reference
from tests.reference import moepp_reference as ref
from tests.tiny_models import (
    assert_grads_match_reference,
    hf_grads,
    reference_config,
    reference_weights,
    tiny_model,
    with_moe,
)

ROUNDING = dict(rtol=1e-6, atol=1e-6)
TOL = dict(rtol=1e-4, atol=1e-5)
NUM_TOKENS = 48


def _route_inputs(model, policy):
    cfg = reference_config(model)
    generator = torch.Generator().manual_seed(1)
    logits_TN = torch.randn(NUM_TOKENS, cfg.num_experts, generator=generator) * 2
    capacity_N = None
    if policy is not None:
        ffn, zc = heterogeneous_capacity(NUM_TOKENS, cfg.topk, cfg.num_ffn_experts, cfg.num_zc, cfg.tau,
                                         model.moe.capacity_factor)
        capacity_N = torch.tensor([ffn] * cfg.num_ffn_experts + [zc] * cfg.num_zc)
    return cfg, logits_TN, capacity_N


@pytest.mark.parametrize(
    "variant,policy", [("paper", None), ("release", "probs"), ("paper", "position")]
)
def test_compiled_route_matches_eager_and_reference(variant, policy):
    model = tiny_model(routing=variant, capacity_factor=None if policy is None else 0.8)
    cfg, logits_TN, capacity_N = _route_inputs(model, policy)
    grad_TN = torch.randn(logits_TN.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, fn in (("eager", route), ("compiled", compiled(route))):
        logits = logits_TN.clone().requires_grad_()
        probs, gates, picked, kept = fn(logits, cfg.topk, variant, cfg.num_zero, capacity_N, policy)
        (gates * grad_TN).sum().backward()
        results[name] = dict(probs=probs, gates=gates, picked=picked, kept=kept, grad=logits.grad)
    eager, fast = results["eager"], results["compiled"]
    assert torch.equal(fast["picked"], eager["picked"]) and torch.equal(fast["kept"], eager["kept"])
    for key in ("probs", "gates", "grad"):
        torch.testing.assert_close(fast[key], eager[key], **ROUNDING)
    if policy != "position":  # the reference implements megatron's default drop policy only
        logits = logits_TN.clone().requires_grad_()
        ref_gates, ref_mask = ref.route(logits, cfg)
        ref_gates, ref_kept = ref.apply_capacity(ref_gates, ref_mask, cfg)
        (ref_gates * grad_TN).sum().backward()
        assert torch.equal(fast["picked"], ref_mask) and torch.equal(fast["kept"], ref_kept)
        torch.testing.assert_close(fast["gates"], ref_gates, **ROUNDING)
        torch.testing.assert_close(fast["grad"], logits.grad, **ROUNDING)
    if policy is not None:
        assert not torch.equal(fast["kept"], fast["picked"]), "the capacity case must drop something"


def test_zc_experts_compiled_and_eager_match_reference():
    torch.manual_seed(0)
    hidden, kinds = 16, ["constant", "constant", "copy", "zero"]
    experts = {
        mode: ZeroComputationExperts(hidden, 2, 1, 1, torch.nn.init.normal_, compile=mode == "compiled")
        for mode in ("eager", "compiled")
    }
    experts["compiled"].load_state_dict(experts["eager"].state_dict())
    x_TD = torch.randn(NUM_TOKENS, hidden)
    gates_TZ = torch.rand(NUM_TOKENS, 4) * (torch.rand(NUM_TOKENS, 4) < 0.5)
    grad_TD = torch.randn(NUM_TOKENS, hidden)
    results = {}
    for mode, module in experts.items():
        x, gates = x_TD.clone().requires_grad_(), gates_TZ.clone().requires_grad_()
        module(x, gates).backward(grad_TD)
        results[mode] = [x.grad, gates.grad, module.constant_gates.grad, module.constant_vectors.grad]
        results[mode].insert(0, module(x_TD, gates_TZ).detach())

    eager = experts["eager"]
    W = eager.constant_gates.detach().clone().requires_grad_()
    v = eager.constant_vectors.detach().clone().requires_grad_()
    x, gates = x_TD.clone().requires_grad_(), gates_TZ.clone().requires_grad_()
    rows = []
    for t in range(NUM_TOKENS):
        y = torch.zeros(hidden)
        for z, kind in enumerate(kinds):
            params = {"wg": W[z], "constant": v[z]} if kind == "constant" else None
            y = y + gates[t, z] * ref.zc_expert(kind, x[t], params)
        rows.append(y)
    expected = torch.stack(rows)
    expected.backward(grad_TD)
    reference = [expected.detach(), x.grad, gates.grad, W.grad, v.grad]
    for fast, slow, want in zip(results["compiled"], results["eager"], reference):
        torch.testing.assert_close(fast, slow, **ROUNDING)
        torch.testing.assert_close(slow, want, **ROUNDING)


def test_zc_experts_without_constant_experts():
    x_TD, gates_TZ = torch.randn(5, 8), torch.rand(5, 2)
    out = zc_experts_forward(x_TD, gates_TZ, torch.empty(0, 2, 8), torch.empty(0, 8), num_copy=1)
    torch.testing.assert_close(out, x_TD * gates_TZ[:, :1])


@pytest.mark.parametrize(
    "case",
    [
        dict(routing="paper", gating_residual=True, capacity_factor=0.8, router="linear"),
        dict(routing="release", gating_residual=True, capacity_factor=None, router="mlp"),
    ],
    ids=lambda c: "-".join(str(v) for v in c.values()),
)
def test_compiled_layer_matches_reference(single_process, case):
    torch.manual_seed(0)
    model = tiny_model(aux_loss_coeff=0.01, compile_routing=True, **case)
    layer = build_moepp_layer(model).train()
    assert layer.config.moepp_compile and layer.zc_experts.compile
    num_experts = layer.router.config.moepp_num_experts
    x = torch.randn(12, 3, model.hidden_size)
    residual = torch.randn(12, 3, num_experts)
    weights = reference_weights(layer, model, prefix="decoder.layers.0.mlp.")
    out, logits, lb, x_grad, residual_grad = run_megatron(layer, x, residual)
    ref_out, ref_logits, aux, ref_x_grad, ref_residual = run_reference(model, weights, x, residual)
    torch.testing.assert_close(logits.view(-1, num_experts), ref_logits, **TOL)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lb, aux["lb_loss"].detach(), **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOL)
    torch.testing.assert_close(residual_grad.view(-1, num_experts), ref_residual.grad, **TOL)
    assert_grads_match_reference(hf_grads(layer, model, prefix="decoder.layers.0.mlp."), weights, **TOL)


def copy_through_checkpoint(source, target) -> None:
    with tempfile.TemporaryDirectory() as directory:
        dist_checkpointing.save(source.sharded_state_dict(), directory)
        target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), directory))


@pytest.mark.parametrize("method", ["moepp", "vanilla"])
def test_grouped_gemm_matches_sequential_mlp(single_process, method):
    torch.manual_seed(0)
    model = tiny_model(method=method, capacity_factor=None)
    sequential = build_moepp_layer(model).train()
    grouped = build_moepp_layer(with_moe(model, grouped_gemm=True)).train()
    assert isinstance(grouped.experts, TorchGroupedMLP)
    copy_through_checkpoint(sequential, grouped)
    x = torch.randn(12, 3, model.hidden_size)
    residual = torch.randn(12, 3, 8) if method == "moepp" else None
    forward = (lambda layer: run_megatron(layer, x, residual)) if method == "moepp" else (
        lambda layer: _vanilla_forward_backward(layer, x)
    )
    for a, b in zip(forward(sequential), forward(grouped)):
        if a is not None:
            torch.testing.assert_close(b, a, **ROUNDING)
    # Gradients: the grouped layer's grads, moved into a SequentialMLP layout, are the
    # sequential layer's grads.
    with torch.no_grad():
        for param in grouped.parameters():
            param.copy_(param.grad)
    grads_as_sequential = build_moepp_layer(model)
    copy_through_checkpoint(grouped, grads_as_sequential)
    for (name, param), moved in zip(sequential.named_parameters(), grads_as_sequential.parameters()):
        torch.testing.assert_close(moved, param.grad, **ROUNDING, msg=name)


def _vanilla_forward_backward(layer, x_SBD):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = x_SBD.clone().requires_grad_()
    out, _ = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad


def test_grouped_gemm_backend_choice(monkeypatch):
    assert grouped_gemm_backend(False, transformer_engine=True, bf16=True) is None
    assert grouped_gemm_backend(True, transformer_engine=True, bf16=True) == "transformer_engine"
    assert grouped_gemm_backend(True, transformer_engine=False, bf16=False) == "torch"  # CPU
    monkeypatch.setattr(grouped_experts, "torch_grouped_mm_supported", lambda bf16: False)
    with pytest.warns(UserWarning, match="SequentialMLP"):
        assert grouped_gemm_backend(True, transformer_engine=False, bf16=True) is None


def test_model_builds_grouped_experts_in_every_layer(single_process):
    for method in ("moepp", "vanilla"):
        model = tiny_model(method=method, grouped_gemm=True)
        (gpt,) = build_model(model, ParallelConfig(cpu_mode=True))
        experts = [layer.mlp.experts for layer in gpt.decoder.layers]
        assert len(experts) == model.num_layers
        assert all(isinstance(e, TorchGroupedMLP) for e in experts)


# Calls that move a tensor's value to the host (a device sync on GPU), or whose output
# shape depends on tensor values.
SYNCING_CALLS = {"item", "tolist", "cpu", "numpy", "nonzero", "masked_select", "synchronize", "unique"}
FAST_PATH_MODULES = ("routing.py", "router.py", "zero_computation_experts.py", "layer.py", "compiled.py")


def test_moepp_modules_have_no_host_sync_calls():
    package = Path(moepp_package.__file__).parent
    found = []
    for name in FAST_PATH_MODULES:
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if call and node.func.attr in SYNCING_CALLS:
                found.append(f"{name}:{node.lineno} .{node.func.attr}()")
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Compare):
                found.append(f"{name}:{node.lineno} boolean indexing")
    assert not found, found
