"""What only a GPU can show (run by scripts/gpu_check.sh; see conftest.py for the CPU dry run):

- the bf16 MoE++ layer (compiled routing, as GPU runs default to) and a bf16 model against
  the fp32 reference of tests/reference;
- routing and ZC experts without a host-device sync (torch's sync debug mode);
- grouped GEMM experts (torch._grouped_mm, CUTLASS on Hopper) against SequentialMLP;
- compiled routing against eager on the GPU;
- the trainer on one GPU: a few bf16 steps with a checkpoint, an exact resume (deterministic
  kernels), and ``moepp-convert to-hf`` of the GPU-written checkpoint, whose HF logits equal
  the megatron model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moepp_megatron.model.grouped_experts import TorchGroupedMLP
from moepp_megatron.moepp.compiled import compiled
from moepp_megatron.moepp.routing import route
from moepp_megatron.moepp.zero_computation_experts import ZeroComputationExperts
from tests.bench.test_fast_path import copy_through_checkpoint
from tests.distributed import find_free_port
from tests.gpu.conftest import cuda_only
from tests.model.test_model_vs_reference import megatron_loss_and_logits
from tests.moepp.test_layer_vs_reference import BF16_UNITS, build_moepp_layer, run_megatron, run_reference
from tests.reference import moepp_reference as ref
from tests.tiny_models import (
    assert_close,
    assert_grads_match_reference,
    hf_grads,
    reference_config,
    reference_weights,
    tiny_model,
    with_moe,
)
from tests.training.runs import run_config_writer, train_losses

pytestmark = pytest.mark.gpu

TOL = dict(rtol=1e-4, atol=1e-5)
# Compiling takes tens of seconds: only the first case compiles its routing (on a GPU).
LAYER_CASES = {
    "paper-linear-capacity-compiled": dict(routing="paper", router="linear", capacity_factor=0.8, compile=True),
    "release-mlp-dropless": dict(routing="release", router="mlp", capacity_factor=None, compile=False),
}


def _layer(model, device, bf16=True):
    return build_moepp_layer(model, bf16=bf16, cpu_mode=device.type == "cpu").to(device).train()


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_bf16_layer_matches_reference(device_process, case):
    device = device_process
    torch.manual_seed(0)
    fields = dict(LAYER_CASES[case])
    compile_routing = fields.pop("compile") and device.type == "cuda"
    model = tiny_model(aux_loss_coeff=0.01, compile_routing=compile_routing, **fields)
    layer = _layer(model, device)
    num_experts = layer.router.config.moepp_num_experts
    x = torch.randn(12, 3, model.hidden_size).bfloat16().float()
    residual = torch.randn(12, 3, num_experts)
    weights = reference_weights(layer, model, prefix="decoder.layers.0.mlp.")
    out, logits, lb, x_grad, residual_grad = run_megatron(layer, x.bfloat16().to(device), residual.to(device))
    ref_out, ref_logits, aux, ref_x_grad, ref_residual = run_reference(model, weights, x, residual)
    # The router computes in fp32 (no TF32): fp32 tolerances, identical routing.
    assert logits.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert_close(logits.view(-1, num_experts), ref_logits, **TOL)
    assert_close(lb, aux["lb_loss"].detach(), **TOL)
    assert_close(out, ref_out, BF16_UNITS)
    assert_close(x_grad, ref_x_grad, BF16_UNITS)
    assert_close(residual_grad.view(-1, num_experts), ref_residual.grad, BF16_UNITS)
    assert_grads_match_reference(hf_grads(layer, model, prefix="decoder.layers.0.mlp."), weights, BF16_UNITS)


def test_bf16_model_matches_reference(device_process):
    """A 2-layer bf16 model (Float16Module) against the fp32 reference. On a GPU the bf16
    kernels round differently from the CPU's, so a near tie in some token's top-k can route
    it elsewhere than in fp32: compared by what such a flip cannot move much, the loss
    (within 2**-6 relative) and the direction of the whole gradient (cosine >= 0.99);
    tests/model checks element-wise on CPU."""
    from megatron.core.transformer.module import Float16Module

    from moepp_megatron.config.schema import ParallelConfig
    from moepp_megatron.model.builder import build_model

    device = device_process
    model = tiny_model(
        num_layers=2, aux_loss_coeff=0.01, routing="release", router="mlp", capacity_factor=1.0, compile_routing=False
    )
    torch.manual_seed(0)
    (gpt,) = build_model(model, ParallelConfig(cpu_mode=device.type == "cpu"), bf16=True)
    gpt = gpt.to(device).train()
    ids = torch.randint(0, model.vocab_size, (2, 16))
    labels = torch.randint(0, model.vocab_size, (2, 16))
    weights = reference_weights(gpt, model)
    ref_logits, aux = ref.model_forward(ids, weights, reference_config(model))
    ref.total_loss(ref_logits, labels, aux, beta=0.01).backward()
    loss, _, _ = megatron_loss_and_logits(Float16Module(gpt.config, gpt), ids.to(device), labels.to(device))
    ref_loss = ref.lm_loss(ref_logits, labels).item()
    assert abs(loss.item() - ref_loss) <= 2**-6 * ref_loss
    grads = hf_grads(gpt, model)
    flat = torch.cat([grads[k].float().cpu().flatten() for k, p in weights.items() if p.grad is not None])
    ref_flat = torch.cat([p.grad.flatten() for p in weights.values() if p.grad is not None])
    cosine = torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0).item()
    print(f"bf16 model on {device}: loss {loss.item():.5f} vs {ref_loss:.5f}, gradient cosine {cosine:.5f}")
    assert cosine >= 0.99


def test_routing_and_zc_experts_do_not_sync(device):
    cuda_only(device, "torch's sync debug mode watches CUDA syncs; tests/bench audits the source on CPU")
    logits_TN = torch.randn(4096, 12, device=device, requires_grad=True)
    capacity_N = torch.full((12,), 900, device=device)
    experts = ZeroComputationExperts(256, 2, 1, 1, torch.nn.init.normal_, compile=True).to(device)
    x_TD = torch.randn(4096, 256, device=device, requires_grad=True)

    def step():
        for fn in (route, compiled(route)):
            _, gates_TN, _, _ = fn(logits_TN, 2, "release", 1, capacity_N, "probs")
            out_TD = experts(x_TD, gates_TN[:, 8:])
            (out_TD.sum() + gates_TN.sum()).backward()

    step()  # compiles outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("method", ["moepp", "vanilla"])
def test_grouped_gemm_matches_sequential_mlp_in_bf16(device_process, method):
    """Different GEMM kernels (one grouped GEMM vs a matmul per expert) on the same bf16
    weights: equal within bf16 rounding."""
    device = device_process
    torch.manual_seed(0)
    model = tiny_model(method=method, capacity_factor=None, compile_routing=False)
    sequential = _layer(model, device)
    grouped = _layer(with_moe(model, grouped_gemm=True), device)
    assert isinstance(grouped.experts, TorchGroupedMLP)
    copy_through_checkpoint(sequential, grouped)
    x = torch.randn(12, 3, model.hidden_size, device=device).bfloat16()
    residual = torch.randn(12, 3, 8, device=device) if method == "moepp" else None
    outputs = []
    for layer in (sequential, grouped):
        if method == "moepp":
            outputs.append(run_megatron(layer, x, residual)[0])
        else:
            out, _ = layer(x)
            out.float().sum().backward()
            outputs.append(out.detach())
    assert_close(outputs[1], outputs[0], BF16_UNITS)


def test_compiled_routing_matches_eager(device):
    cuda_only(device, "tests/bench/test_fast_path.py compares compiled and eager routing on CPU")
    logits_TN = torch.randn(4096, 12, device=device) * 2
    capacity_N = torch.full((12,), 700, device=device)
    eager = route(logits_TN, 2, "release", 1, capacity_N, "probs")
    fast = compiled(route)(logits_TN, 2, "release", 1, capacity_N, "probs")
    names = ("probs", "gates", "picked", "kept")
    for name, a, b in zip(names, eager, fast):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


# ---- the trainer on one device --------------------------------------------------------------

def _train(*runs: tuple) -> None:
    """Runs ``moepp-train`` once per (config, *overrides), side by side (world size 1 each)."""
    processes = []
    for config, *overrides in runs:
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(find_free_port())}
        env.pop("MOEPP_CPU_MODE", None)
        command = [sys.executable, "-m", "moepp_megatron.training.train", "--config", str(config), *overrides]
        processes.append(subprocess.Popen(command, env=env))
    for process in processes:
        # A step budget stops with a checkpoint to resume from: 75.
        stops_early = any("exit_after_iters" in arg for arg in process.args)
        assert process.wait(timeout=300) == (75 if stops_early else 0), process.args


def _hf_vs_megatron(run_dir, hf_dir) -> float:
    """Max |HF - megatron| logit difference, computed in a CPU process (conversion and the
    reference megatron model run in CPU mode, which refuses to run beside CUDA)."""
    code = (
        "import json, sys, torch\n"
        "from tests.conversion.helpers import hf_model, megatron_logits, megatron_model\n"
        "ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))\n"
        f"expected = megatron_logits(megatron_model({str(run_dir)!r}), ids)\n"
        f"with torch.no_grad(): logits = hf_model({str(hf_dir)!r})(ids).logits\n"
        "print(json.dumps((logits - expected).abs().max().item()))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_resume_exactly_and_export(device, tmp_path_factory):
    from tests.fixtures import tiny_blend

    root = tmp_path_factory.mktemp("gpu-train")
    write = run_config_writer(tiny_blend(tmp_path_factory.mktemp("gpu-data")), root)
    sections = dict(
        model={"moe": {"compile_routing": False}},
        parallel={"expert": 1, "cpu_mode": device.type == "cpu"},
        # bf16 is the GPU default; set here so the CPU dry run takes the same path.
        training={"train_iters": 6, "bf16": True, "deterministic": True, "eval_interval": 100},
        checkpoint={"save_interval": 3},
    )
    stopped = write("stopped", **sections)
    _train((write("straight", **sections),), (stopped, "training.exit_after_iters=3"))
    _train((stopped,))
    expected, resumed = train_losses(root / "straight"), train_losses(root / "stopped")
    print(f"losses on {device}: {expected}")
    assert sorted(expected) == list(range(1, 7)) and resumed == expected

    hf_dir = root / "stopped-hf"
    subprocess.run([sys.executable, "-m", "moepp_megatron.conversion.cli", "to-hf", "--checkpoint",
                    str(root / "stopped"), "--output", str(hf_dir), "--dtype", "fp32"], check=True, timeout=300)
    difference = _hf_vs_megatron(root / "stopped", hf_dir)
    print(f"max |HF - megatron| logit difference of the {device}-written checkpoint: {difference:.2e}")
    assert difference < 1e-4
