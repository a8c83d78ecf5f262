"""The CPU + gloo mode runs stock megatron-core pieces in several processes.

Each multi-process test starts fresh processes through ``tests.distributed.run_distributed``
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
    """Tiny MoE GPT config; parallel sizes are taken from the initialised parallel_state."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    kw = dict(
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
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
        pipeline_dtype=torch.float32,
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


def _shard(full, name, param, tp_rank, tp_size, etp_rank, etp_size):
    """Slice of a full (TP=1) tensor held by this rank, from megatron's TP param attributes."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    is_expert = ".local_experts." in name
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
                name,
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


@pytest.mark.parametrize(
    "world,kwargs,name",
    [
        (3, dict(tensor_parallel=2), "tensor_parallel"),
        (4, dict(pipeline_parallel=3), "pipeline_parallel"),
        (4, dict(expert_parallel=3), "expert_parallel"),
        (6, dict(tensor_parallel=2, expert_parallel=2), "expert_parallel"),
        (4, dict(pipeline_parallel=1, virtual_pipeline_parallel=2), "virtual_pipeline_parallel"),
    ],
)
def test_initialize_parallel_checks_sizes(world, kwargs, name):
    # The check initialize_parallel runs before anything is set up; called directly, it runs
    # whether or not an earlier test left a process group in this process.
    from moepp_megatron.parallel.layout import check_sizes

    sizes = dict(tensor_parallel=1, pipeline_parallel=1, expert_parallel=1,
                 virtual_pipeline_parallel=None, expert_tensor_parallel=None)
    with pytest.raises(ValueError, match=name):
        check_sizes(world, **{**sizes, **kwargs})


def test_cpu_mode_requested(monkeypatch):
    from moepp_megatron.compat.cpu import cpu_mode_requested

    monkeypatch.setenv("MOEPP_CPU_MODE", "1")
    assert cpu_mode_requested()
    monkeypatch.setenv("MOEPP_CPU_MODE", "0")
    assert not cpu_mode_requested()
    monkeypatch.delenv("MOEPP_CPU_MODE")
    assert not cpu_mode_requested()


# ----------------------------------------------------------------------------- harness


def _harness_values(x):
    import torch.distributed as dist

    dist.init_process_group("gloo")  # from the env the harness set
    t = torch.full((2,), float(dist.get_rank()))
    dist.all_reduce(t)
    return {
        "rank": int(os.environ["RANK"]),
        "world": int(os.environ["WORLD_SIZE"]),
        "cpu_mode": os.environ["MOEPP_CPU_MODE"],
        "threads": torch.get_num_threads(),
        "x": x,
        "sum": t,
    }


def _harness_fail_on_rank1():
    import time

    if os.environ["RANK"] == "1":
        raise ValueError("boom on rank 1")
    time.sleep(120)  # rank 0 "hangs" waiting for its peer: must be killed, not waited for


def _harness_hang(pid_dir):
    import time

    with open(os.path.join(pid_dir, os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_harness_returns_values_by_rank():
    results = run_distributed(_harness_values, 3, x=5)
    assert [r["rank"] for r in results] == [0, 1, 2]
    for r in results:
        assert r["world"] == 3 and r["cpu_mode"] == "1" and r["threads"] == 1 and r["x"] == 5
        torch.testing.assert_close(r["sum"], torch.full((2,), 3.0))


def test_harness_reports_failing_rank():
    import time

    from tests.distributed import DistributedTestError

    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="rank 1") as info:
        run_distributed(_harness_fail_on_rank1, 2, timeout=60)
    assert "ValueError: boom on rank 1" in str(info.value)
    assert "_harness_fail_on_rank1" in str(info.value)  # the rank's traceback
    assert time.monotonic() - start < 55  # well before the 60 s timeout


def test_harness_kills_hung_ranks(tmp_path):
    from tests.distributed import DistributedTestTimeout

    # Forked from the warm fork server, a rank writes its pid within a second or two of its
    # start; 20 s leaves that a wide margin on a loaded machine.
    with pytest.raises(DistributedTestTimeout, match="did not finish"):
        run_distributed(_harness_hang, 2, str(tmp_path), timeout=20)
    pids = [int((tmp_path / str(r)).read_text()) for r in range(2)]
    assert not any(_alive(pid) for pid in pids), pids


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
        model = _model(_config(moe_token_dispatcher_type=dispatcher))  # TP=2 with SP
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
            expected = _shard(ref_grads[name], name, param, *tp)
            _assert_close(g, expected, f"{dispatcher}: grad {name}", rtol=1e-4, atol=1e-6)
        assert n_sharded > 0
        out[dispatcher] = loss.detach()
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


def _uneven_sp_worker():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings

    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(tensor_parallel=2, seed=1)
    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    sizes = [3, 5]  # rank r holds sizes[r] rows, as with token counts after routing
    full = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)
    mine = full[sum(sizes[:rank]) : sum(sizes[: rank + 1])].clone().requires_grad_(True)
    gathered = mappings.gather_from_sequence_parallel_region(
        mine, group=group, output_split_sizes=sizes
    )
    torch.testing.assert_close(gathered, full, rtol=0, atol=0)
    # Backward: reduce-scatter with the same uneven splits; every rank used weight (1 + rank).
    (gathered * (1.0 + rank)).sum().backward()
    torch.testing.assert_close(mine.grad, torch.full_like(mine, 3.0), rtol=0, atol=0)
    # Forward reduce-scatter with uneven splits.
    out = mappings.reduce_scatter_to_sequence_parallel_region(
        full * (1.0 + rank), group=group, input_split_sizes=sizes
    )
    want = 3.0 * full[sum(sizes[:rank]) : sum(sizes[: rank + 1])]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    destroy_parallel()
    return True


def test_uneven_sequence_parallel_gather_and_reduce_scatter():
    assert run_distributed(_uneven_sp_worker, 2) == [True, True]


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
            # Above clip_grad, so clip_grad_by_total_norm_fp32 really rescales.
            assert grad_norm > 0.05, f"grad norm {grad_norm} <= clip_grad"
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


# ----------------------------------------------------------------------------- pipeline


def _stage_models(config, vpp):
    from megatron.core import parallel_state as ps

    if vpp is None:
        return [
            _model(
                config,
                pre_process=ps.is_pipeline_first_stage(),
                post_process=ps.is_pipeline_last_stage(),
            )
        ]
    chunks = []
    for vp_stage in range(vpp):
        chunks.append(
            _model(
                config,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
        )
    return chunks


def _global_layer_name(model, name):
    """'decoder.layers.<i>.' (local index) -> the global layer index of that layer."""
    marker = "decoder.layers."
    if not name.startswith(marker):
        return name
    local, rest = name[len(marker) :].split(".", 1)
    layer_number = model.decoder.layers[int(local)].layer_number  # 1-based, global
    return f"{marker}{layer_number - 1}.{rest}"


def _pp_worker(num_layers, vpp, num_microbatches):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    seeds = [300 + i for i in range(num_microbatches)]

    # Reference: the whole model on every rank (PP=1), no-pipelining schedule.
    initialize_parallel(seed=3)
    ref = _model(_config(num_layers=num_layers))
    full = {k: v.clone() for k, v in ref.state_dict().items() if v is not None}
    ref_losses = _run_schedule([ref], ref.config, seeds)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ps.destroy_model_parallel()

    initialize_parallel(pipeline_parallel=2, virtual_pipeline_parallel=vpp, seed=3)
    config = _config(num_layers=num_layers)
    chunks = _stage_models(config, vpp)
    for chunk in chunks:
        chunk.load_state_dict(
            {
                k: (full[_global_layer_name(chunk, k)] if v is not None else v)
                for k, v in chunk.state_dict().items()
            }
        )
    losses = _run_schedule(chunks, config, seeds)
    n_params = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            gname = _global_layer_name(chunk, name)
            _assert_close(p.grad, ref_grads[gname], f"PP grad {name} (= {gname})", 1e-4, 1e-6)
            n_params += 1
    # Each rank holds part of the model; together they hold all of it.
    counts = torch.tensor([n_params])
    dist.all_reduce(counts)
    assert counts.item() == len(ref_grads), (counts.item(), len(ref_grads))
    if ps.is_pipeline_last_stage():
        assert len(losses) == num_microbatches
        for got, want in zip(losses, ref_losses):
            _assert_close(got, want, "PP loss", 1e-5, 1e-6)
    else:
        assert losses == []
    destroy_parallel()
    return [l.item() for l in losses]


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_layers,vpp", [(2, None), (4, 2)], ids=["1f1b", "interleaved"]
)
def test_pipeline_parallel_schedules(num_layers, vpp):
    results = run_distributed(_pp_worker, 2, num_layers, vpp, 4)
    assert results[0] == []
    assert len(results[1]) == 4 and len(set(results[1])) == 4  # 4 distinct microbatches


# ----------------------------------------------------------------------------- RNG + recompute


def _rng_worker(seed):
    """The CPU RNG tracker forks real, reproducible generator states like the CUDA tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.random import (
        get_data_parallel_rng_tracker_name,
        get_expert_parallel_rng_tracker_name,
    )

    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(expert_parallel=2, seed=seed)
    tracker = get_cuda_rng_tracker()
    ep_rank = ps.get_expert_model_parallel_rank()

    def stream(s, n):
        return torch.rand(n, generator=torch.Generator().manual_seed(s))

    # Default generator: seeded with `seed` (PP rank 0); forks do not disturb it.
    expected_default = stream(seed, 8)
    a = torch.rand(4)
    with tracker.fork():
        mp1 = torch.rand(4)
    with tracker.fork(get_expert_parallel_rng_tracker_name()):
        ep1 = torch.rand(4)
    b = torch.rand(4)
    torch.testing.assert_close(torch.cat([a, b]), expected_default, rtol=0, atol=0)
    # Model-parallel state: seed + 2718 + tp_rank; it continues where the last fork stopped.
    with tracker.fork():
        mp2 = torch.rand(4)
    torch.testing.assert_close(torch.cat([mp1, mp2]), stream(seed + 2718, 8), rtol=0, atol=0)
    # Expert-parallel state: seed + 1024 + 100 * ep_rank + etp_rank (differs between EP ranks).
    torch.testing.assert_close(ep1, stream(seed + 1024 + 100 * ep_rank, 4), rtol=0, atol=0)
    with tracker.fork(get_data_parallel_rng_tracker_name()):
        dp1 = torch.rand(4)
    torch.testing.assert_close(dp1, stream(seed, 4), rtol=0, atol=0)
    # Nested forks restore the outer state.
    with tracker.fork():
        with tracker.fork(get_expert_parallel_rng_tracker_name()):
            ep2 = torch.rand(4)
        mp3 = torch.rand(4)
    torch.testing.assert_close(ep2, stream(seed + 1024 + 100 * ep_rank, 8)[4:], rtol=0, atol=0)
    torch.testing.assert_close(mp3, stream(seed + 2718, 12)[8:], rtol=0, atol=0)

    # Same seed -> same init; experts differ between EP ranks.
    initialize_parallel(expert_parallel=2, seed=seed)
    m1 = {k: v for k, v in _model(_config()).state_dict().items() if v is not None}
    initialize_parallel(expert_parallel=2, seed=seed)
    m2 = {k: v for k, v in _model(_config()).state_dict().items() if v is not None}
    initialize_parallel(expert_parallel=2, seed=seed + 1)
    m3 = {k: v for k, v in _model(_config()).state_dict().items() if v is not None}
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert not any(torch.equal(m1[k], m3[k]) for k in m1 if "weight" in k and "norm" not in k)
    destroy_parallel()
    return {k: v for k, v in m1.items() if ".local_experts.0.linear_fc1" in k}


def test_rng_tracker_is_deterministic_and_forks():
    r0, r1 = run_distributed(_rng_worker, 2, 1234)
    assert r0.keys() == r1.keys() and r0
    for k in r0:  # expert 0 of EP rank 0 (global 0) vs EP rank 1 (global 2)
        assert not torch.equal(r0[k], r1[k]), k


_RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_block": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2
    ),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "selective_moe": dict(
        recompute_granularity="selective", recompute_modules=["core_attn", "moe", "layernorm"]
    ),
}


def _recompute_worker():
    from megatron.core.tensor_parallel import random as mrandom

    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    dropout = dict(hidden_dropout=0.2, attention_dropout=0.2, moe_token_dispatcher_type="alltoall")
    results = {}
    for name, kw in _RECOMPUTE.items():
        initialize_parallel(expert_parallel=2, seed=99)  # re-seeds: same init, same masks
        model = _model(_config(**dropout, **kw))
        results[name] = _loss_and_grads(model, seed=int(os.environ["RANK"]))
        if name == "none":
            # Dropout is active: a second pass (generator moved on) gives another loss.
            again, _ = _loss_and_grads(model, seed=int(os.environ["RANK"]))
            assert not torch.allclose(again, results[name][0]), "dropout inactive?"

    # Negative control: recompute without restoring the RNG states gives other grads, so the
    # comparisons below do test the restore.
    orig = mrandom._set_all_rng_states
    initialize_parallel(expert_parallel=2, seed=99)
    model = _model(_config(**dropout, **_RECOMPUTE["full"]))
    mrandom._set_all_rng_states = lambda *a, **k: None
    try:
        _, bad_grads = _loss_and_grads(model, seed=int(os.environ["RANK"]))
    finally:
        mrandom._set_all_rng_states = orig
    ref_loss, ref_grads = results["none"]
    assert any(
        not torch.allclose(bad_grads[k], ref_grads[k], rtol=1e-4, atol=1e-6) for k in ref_grads
    ), "recompute without RNG restore still matched: the test would not catch a broken restore"

    for name, (loss, grads) in results.items():
        _assert_close(loss, ref_loss, f"{name}: loss", 0, 0)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            _assert_close(grads[k], ref_grads[k], f"{name}: grad {k}", 1e-5, 1e-7)
    destroy_parallel()
    return {name: loss.mean().item() for name, (loss, _) in results.items()}


@pytest.mark.slow
def test_recompute_matches_no_recompute():
    results = run_distributed(_recompute_worker, 2)
    assert set(results[0]) == set(_RECOMPUTE)


# ----------------------------------------------------------------------------- dist-ckpt


def _dist_ckpt_worker(ckpt_dir):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    rank = int(os.environ["RANK"])
    # Save from an EP=2 model.
    initialize_parallel(expert_parallel=2, seed=17)
    model = _model(_config())
    saved = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    loss_saved, _ = _loss_and_grads(model, seed=50 + rank)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)  # default: torch_dist
    dist.barrier()

    # Load into a differently initialised EP=2 model: weights round-trip exactly.
    initialize_parallel(expert_parallel=2, seed=18)
    fresh = _model(_config())
    assert not all(
        torch.equal(v, saved[k]) for k, v in fresh.state_dict().items() if v is not None
    )
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir))
    for k, v in fresh.state_dict().items():
        if v is not None:
            assert torch.equal(v, saved[k]), f"{k} did not round-trip"

    # Reshard on load: EP=1 (every rank holds all experts) computes the same losses.
    ps.destroy_model_parallel()
    initialize_parallel(expert_parallel=1, seed=19)
    ep1 = _model(_config())
    ep1.load_state_dict(dist_checkpointing.load(ep1.sharded_state_dict(), ckpt_dir))
    loss_ep1, _ = _loss_and_grads(ep1, seed=50 + rank)
    _assert_close(loss_ep1, loss_saved, "EP=1 loss after loading the EP=2 checkpoint")
    destroy_parallel()
    return {k: v for k, v in saved.items() if ".local_experts." in k}


@pytest.mark.slow
def test_dist_checkpointing_round_trip(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    r0, r1 = run_distributed(_dist_ckpt_worker, 2, str(ckpt))
    assert (ckpt / "metadata.json").exists()
    # The two ranks saved different experts (the checkpoint really is sharded).
    assert any(not torch.equal(r0[k], r1[k]) for k in r0)


def _optimizer_resume_worker(ckpt_dir):
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from moepp_megatron.compat.megatron_internals import (
        allocate_optimizer_states_for_loading,
        load_optimizer_state,
    )
    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    rank = int(os.environ["RANK"])
    # 0.16.1: 'fully_model_space' (default) is broken, see docs/MEGATRON_NOTES.md.
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}

    def build(seed):
        initialize_parallel(expert_parallel=2, seed=seed)
        config = _config()
        gpt = _model(config)
        ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True
            ),
            module=gpt,
        )
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp]
        )
        config.finalize_model_grads_func = finalize_model_grads
        return config, gpt, ddp, opt

    def step(config, ddp, opt, seeds):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        _run_schedule([ddp], config, seeds)
        assert opt.step()[0]

    config, gpt, ddp, opt = build(seed=1)
    step(config, ddp, opt, [10 + rank, 20 + rank])
    msd = gpt.sharded_state_dict()
    dist_checkpointing.save(
        {"model": msd, "optimizer": opt.sharded_state_dict(msd, metadata=metadata)}, ckpt_dir
    )
    step(config, ddp, opt, [30 + rank, 40 + rank])
    expected = {n: p.detach().clone() for n, p in gpt.named_parameters()}

    # Resume in a fresh model/optimizer (other init) and take the same second step.
    config, gpt, ddp, opt = build(seed=2)
    allocate_optimizer_states_for_loading(opt)  # 0.16.1 + torch Adam
    msd = gpt.sharded_state_dict()
    sharded = {
        "model": msd,
        "optimizer": opt.sharded_state_dict(msd, is_loading=True, metadata=metadata),
    }
    state = dist_checkpointing.load(sharded, ckpt_dir)
    gpt.load_state_dict(state["model"])
    load_optimizer_state(opt, state["optimizer"])
    step(config, ddp, opt, [30 + rank, 40 + rank])
    for n, p in gpt.named_parameters():
        _assert_close(p.detach(), expected[n], f"resumed {n}", rtol=0, atol=1e-7)
    destroy_parallel()
    return True


@pytest.mark.slow
def test_distributed_optimizer_resume_is_exact(tmp_path):
    assert run_distributed(_optimizer_resume_worker, 2, str(tmp_path)) == [True, True]
