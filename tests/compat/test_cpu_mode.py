"""The CPU + gloo mode runs stock megatron-core pieces in several processes.

Each multi-process test spawns fresh processes through ``tests.distributed.run_distributed``
(CPU mode is never switched on in the pytest process itself). Workers are top-level functions
returning small dicts; the assertions that compare numbers live in the workers (they raise
AssertionError with the values) and in the tests.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_distributed

VOCAB = 64
SEQ = 16
MICRO_BATCH = 2
NUM_EXPERTS = 4


# ----------------------------------------------------------------------------- helpers
# (run inside the worker processes)


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=4,
        ffn_hidden_size=32,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_token_dispatcher_type="allgather",
        moe_aux_loss_coeff=0.01,
        moe_router_load_balancing_type="aux_loss",
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def _model(config, pre_process=True, post_process=True, vp_stage=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
        vp_stage=vp_stage,
    )


def _batch(seed, batch=MICRO_BATCH):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(batch, -1)
    return tokens[:, :-1].contiguous(), position_ids, tokens[:, 1:].contiguous()


def _loss_and_grads(model, seed):
    """Per-token loss on batch ``seed`` and a copy of every grad (grads zeroed first)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    model.zero_grad(set_to_none=True)
    tokens, pos, labels = _batch(seed)
    loss = model(tokens, pos, None, labels=labels)
    loss.mean().backward()
    clear_aux_losses_tracker()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().clone(), grads


def _global_expert_name(name, ep_rank, num_local_experts):
    """'...experts.local_experts.<j>....' on EP rank r -> global expert index."""
    marker = ".local_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker, 1)
    local, rest = tail.split(".", 1)
    return f"{head}{marker}{ep_rank * num_local_experts + int(local)}.{rest}"


def _shard(full, param, tp_rank, tp_size, etp_rank, etp_size):
    """Slice of a full (TP=1) tensor held by this rank, from megatron's TP param attributes."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    is_expert = not getattr(param, "allreduce", True)
    rank, size = (etp_rank, etp_size) if is_expert else (tp_rank, tp_size)
    return torch.chunk(full, size, dim=param.partition_dim)[rank].clone()


def _load_from_full(model, full_state):
    """Load a full TP=1/EP=1 state dict into a (TP, EP)-parallel model of the same config."""
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    ep_size = ps.get_expert_model_parallel_world_size()
    local = NUM_EXPERTS // ep_size
    params = dict(model.named_parameters())
    state = {}
    for name, value in model.state_dict().items():
        if value is None:  # e.g. '_extra_state' entries
            state[name] = value
            continue
        src = full_state[_global_expert_name(name, ep_rank, local)]
        if name in params:
            src = _shard(
                src,
                params[name],
                ps.get_tensor_model_parallel_rank(),
                ps.get_tensor_model_parallel_world_size(),
                ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_world_size(),
            )
        assert src.shape == value.shape, (name, src.shape, value.shape)
        state[name] = src
    model.load_state_dict(state, strict=True)


def _assert_close(actual, expected, what, rtol=1e-5, atol=1e-6):
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        diff = (actual - expected).abs().max().item()
        raise AssertionError(
            f"{what}: max abs diff {diff:.3e} (|actual| {actual.norm():.6e}, "
            f"|expected| {expected.norm():.6e}, shape {tuple(actual.shape)})"
        )


# ----------------------------------------------------------------------------- refusal


def test_refuses_when_cuda_available(monkeypatch):
    from moepp_megatron.compat import cpu

    monkeypatch.setattr(cpu, "_ENABLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA"):
        cpu.enable_cpu_mode()
    assert not cpu.cpu_mode_enabled()


def test_initialize_parallel_refuses_cpu_mode_with_cuda(monkeypatch):
    from moepp_megatron.compat import cpu
    from moepp_megatron.parallel.initialize import initialize_parallel

    monkeypatch.setattr(cpu, "_ENABLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA"):
        initialize_parallel(cpu_mode=True)


def test_cpu_mode_requested(monkeypatch):
    from moepp_megatron.compat.cpu import cpu_mode_requested

    monkeypatch.setenv("MOEPP_CPU_MODE", "1")
    assert cpu_mode_requested()
    monkeypatch.setenv("MOEPP_CPU_MODE", "0")
    assert not cpu_mode_requested()
    monkeypatch.delenv("MOEPP_CPU_MODE")
    assert not cpu_mode_requested()


# ----------------------------------------------------------------------------- EP


def _ep_worker():
    from megatron.core import parallel_state as ps

    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    rank = int(os.environ["RANK"])
    out = {}
    for dispatcher in ("allgather", "alltoall"):
        # Reference: EP=1 (every rank holds all experts), batches of both ranks.
        initialize_parallel(expert_parallel=1, seed=7)
        ref_model = _model(_config(moe_token_dispatcher_type=dispatcher))
        full = {k: v.clone() for k, v in ref_model.state_dict().items() if v is not None}
        ref = [_loss_and_grads(ref_model, seed=100 + r) for r in range(2)]
        ps.destroy_model_parallel()

        initialize_parallel(expert_parallel=2, seed=7)
        assert ps.get_expert_model_parallel_world_size() == 2
        model = _model(_config(moe_token_dispatcher_type=dispatcher))
        _load_from_full(model, full)
        loss, grads = _loss_and_grads(model, seed=100 + rank)
        _assert_close(loss, ref[rank][0], f"{dispatcher}: EP=2 loss vs EP=1")
        n_expert = 0
        for name, g in grads.items():
            gname = _global_expert_name(name, rank, NUM_EXPERTS // 2)
            if ".local_experts." in name:
                # An expert sees the tokens of both EP ranks: its grad is the sum of the EP=1
                # grads from both batches.
                n_expert += 1
                expected = ref[0][1][gname] + ref[1][1][gname]
            else:
                expected = ref[rank][1][name]
            _assert_close(g, expected, f"{dispatcher}: grad {name}", rtol=1e-4, atol=1e-6)
        assert n_expert > 0
        out[dispatcher] = loss.mean().item()
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


@pytest.mark.slow
def test_expert_parallel_matches_ep1():
    results = run_distributed(_ep_worker, 2)
    # Different batches per rank: losses differ between ranks but each matched EP=1.
    assert results[0]["allgather"] == pytest.approx(results[0]["alltoall"], rel=1e-6)
    assert results[0]["allgather"] != pytest.approx(results[1]["allgather"], rel=1e-6)


# ----------------------------------------------------------------------------- TP + SP


def _tp_worker():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    out = {}
    for dispatcher in ("allgather", "alltoall"):
        initialize_parallel(seed=11)
        ref_model = _model(_config(moe_token_dispatcher_type=dispatcher))
        full = {k: v.clone() for k, v in ref_model.state_dict().items() if v is not None}
        ref_loss, ref_grads = _loss_and_grads(ref_model, seed=5)
        ps.destroy_model_parallel()

        initialize_parallel(tensor_parallel=2, seed=11)
        cfg = _config(
            moe_token_dispatcher_type=dispatcher,
            tensor_model_parallel_size=2,
            sequence_parallel=True,
        )
        model = _model(cfg)
        _load_from_full(model, full)
        loss, grads = _loss_and_grads(model, seed=5)  # same batch on both TP ranks
        _assert_close(loss, ref_loss, f"{dispatcher}: TP=2+SP loss vs TP=1", rtol=1e-5, atol=1e-5)
        params = dict(model.named_parameters())
        tp = (ps.get_tensor_model_parallel_rank(), 2, ps.get_expert_tensor_parallel_rank(), 2)
        n_sharded = 0
        for name, g in grads.items():
            param = params[name]
            if getattr(param, "tensor_model_parallel", False):
                n_sharded += 1
            else:
                # Replicated params (norms, router) see only this rank's sequence chunk under
                # SP; finalize_model_grads would sum them over TP.
                dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
            expected = _shard(ref_grads[name], param, *tp)
            _assert_close(g, expected, f"{dispatcher}: grad {name}", rtol=1e-4, atol=1e-6)
        assert n_sharded > 0
        out[dispatcher] = loss.detach()
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


@pytest.mark.slow
def test_tensor_parallel_sequence_parallel_matches_tp1():
    results = run_distributed(_tp_worker, 2)
    torch.testing.assert_close(results[0]["allgather"], results[1]["allgather"])
    torch.testing.assert_close(results[0]["allgather"], results[0]["alltoall"])


# ----------------------------------------------------------------------------- DDP + optimizer


def _forward_step(data_iterator, model):
    tokens, pos, labels = next(data_iterator)
    output = model(tokens, pos, None, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def _run_schedule(model_chunks, config, batch_seeds, forward_only=False):
    """One global batch through megatron's schedule; returns the per-microbatch losses."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = iter([_batch(s) for s in batch_seeds])
    n = len(model_chunks)
    # The interleaved schedule wants one iterator per model chunk (all read the same data).
    if n > 1:
        batches = [_batch(s) for s in batch_seeds]
        data = [iter(batches) for _ in range(n)]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=data,
        model=model_chunks if n > 1 else model_chunks[0],
        num_microbatches=len(batch_seeds),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )
    return [d["lm loss"] for d in losses]


def _ddp_worker(steps=3):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    rank = int(os.environ["RANK"])
    out = {}
    for use_dist_opt in (False, True):
        # EP=2: dense params are data-parallel over 2 ranks, experts are not replicated.
        initialize_parallel(expert_parallel=2, seed=21)
        config = _config(moe_token_dispatcher_type="alltoall")
        gpt = _model(config)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_dist_opt,
            bucket_size=None,
        )
        model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt)
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            weight_decay=0.01,
            clip_grad=0.05,  # small: the clip path really rescales
            use_distributed_optimizer=use_dist_opt,
            params_dtype=torch.float32,
        )
        optimizer = get_megatron_optimizer(opt_config, [model])
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync
        initial = {n: p.detach().clone() for n, p in gpt.named_parameters()}

        losses, norms = [], []
        for step in range(steps):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            # Different data per DP rank, the same batches every step.
            mb_losses = _run_schedule([model], config, [1000 + 10 * rank, 1001 + 10 * rank])
            ok, grad_norm, _ = optimizer.step()
            assert ok, "optimizer step skipped"
            assert grad_norm is not None and torch.isfinite(torch.tensor(grad_norm)), grad_norm
            assert grad_norm > 0.05, f"grad norm {grad_norm} should exceed clip_grad to test clipping"
            losses.append(torch.stack(mb_losses).mean().item())
            norms.append(grad_norm)

        final = {n: p.detach().clone() for n, p in gpt.named_parameters()}
        changed = [n for n in final if not torch.equal(final[n], initial[n])]
        assert len(changed) == len(final), f"params not updated: {set(final) - set(changed)}"
        # Dense params stay identical across the DP replicas.
        for name, p in final.items():
            if ".local_experts." in name:
                continue
            other = p.clone()
            dist.broadcast(other, src=0)
            _assert_close(p, other, f"dist_opt={use_dist_opt}: DP replicas of {name} differ", 0, 0)
        out[use_dist_opt] = {"losses": losses, "norms": norms, "params": final}
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


@pytest.mark.slow
def test_ddp_and_optimizer_step():
    results = run_distributed(_ddp_worker, 2)
    for rank_result in results:
        plain, dist_opt = rank_result[False], rank_result[True]
        # Training on a fixed batch: the loss goes down.
        assert plain["losses"][-1] < plain["losses"][0], plain["losses"]
        # The distributed optimizer is numerically the same algorithm.
        assert plain["norms"] == pytest.approx(dist_opt["norms"], rel=1e-5)
        assert plain["losses"] == pytest.approx(dist_opt["losses"], rel=1e-5)
        for name, p in plain["params"].items():
            torch.testing.assert_close(dist_opt["params"][name], p, rtol=1e-5, atol=1e-6)
    # The grad norm is global (all-reduced): both ranks report the same one.
    assert results[0][False]["norms"] == pytest.approx(results[1][False]["norms"], rel=1e-6)
