"""Activation recomputation must not change gradients, gating residuals included.

Full recompute checkpoints whole layers (the residual travels as ``context``, an argument
of the checkpointed function); selective "moe" recompute checkpoints the MoE++ layer with
the residual as an argument. Gradients of every parameter and the aux losses must match
the run without recomputation exactly up to fp32 reordering.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
)

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.model.builder import build_model
from tests.tiny_models import tiny_model


def _gradients(model, parallel, ids, labels):
    torch.manual_seed(0)
    (gpt,) = build_model(model, parallel)
    gpt.train()
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    loss = gpt(ids, positions, None, labels=labels).mean()
    loss.backward()
    aux = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
    # The first MoE++ layer's gate_map has no residual to act on, hence no grad.
    grads = {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}
    return loss.detach(), aux, grads


@pytest.mark.parametrize(
    "recompute, modules",
    # ("layernorm" needs Transformer Engine: megatron's CheckpointWithoutOutput uses FP8 state.)
    [("full", ["moe"]), ("selective", ["moe"])],
)
@pytest.mark.parametrize("routing", ["paper", "release"])
def test_recompute_gives_same_gradients(single_process, recompute, modules, routing):
    model = tiny_model(num_layers=3, routing=routing, router="mlp", capacity_factor=1.0)
    ids = torch.randint(0, model.vocab_size, (2, model.seq_length))
    labels = torch.randint(0, model.vocab_size, (2, model.seq_length))
    base = _gradients(model, ParallelConfig(cpu_mode=True), ids, labels)
    parallel = ParallelConfig(cpu_mode=True, recompute=recompute, recompute_modules=modules)
    loss, aux, grads = _gradients(model, parallel, ids, labels)

    torch.testing.assert_close(loss, base[0], rtol=0, atol=0)
    # Counted once per layer, not once more for the recomputed forward.
    torch.testing.assert_close(aux, base[1], rtol=1e-6, atol=0)
    assert grads.keys() == base[2].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, base[2][name], rtol=1e-6, atol=1e-8, msg=name)
    gate_maps = [g for n, g in grads.items() if n.endswith("router.gate_map")]
    assert gate_maps[1].abs().sum() > 0, "the gating residual must receive gradient"
