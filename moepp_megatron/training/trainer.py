"""The pretraining loop. It wires components built elsewhere (model builder, data,
optimizer, checkpointer, metrics) and owns only the order of things: restore, then
step -> log -> evaluate -> checkpoint, until done or asked to stop."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from moepp_megatron.checkpoint.checkpointer import (
    Checkpointer,
    CheckpointError,
    TrainState,
    saved_iterations,
)
from moepp_megatron.config.loader import resolved_config_yaml, to_dict
from moepp_megatron.config.schema import CheckpointConfig, ParallelConfig, RunConfig
from moepp_megatron.data.blend import build_gpt_datasets
from moepp_megatron.data.tokenizer import load_tokenizer
from moepp_megatron.files import write_durably
from moepp_megatron.model.builder import build_model
from moepp_megatron.model.hardware import peak_flops
from moepp_megatron.model.size import format_count, training_flops_per_token
from moepp_megatron.moepp.config import dropless, has_capacity
from moepp_megatron.moepp.statistics import (
    collect_aux_losses,
    collect_routing_statistics,
    routing_statistics_group,
)
from moepp_megatron.parallel.initialize import initialize_parallel
from moepp_megatron.signals import stop_request
from moepp_megatron.training.data_loader import build_data_iterator
from moepp_megatron.training.forward_step import gpt_forward_step
from moepp_megatron.training.metrics import MetricsLogger, layer_key
from moepp_megatron.training.optimizer import build_optimizer
from moepp_megatron.training.plan import RunPlan, describe, plan_run
from moepp_megatron.training.progress import Progress, format_duration, progress_text
from moepp_megatron.training.resume import resume_report
from moepp_megatron.training.run_dir import RunDirLock, RunDirLockedError, write_outcome

# Preempted or out of time (SIGTERM / SIGUSR1): checkpoint saved, run again to resume.
EXIT_PREEMPTED = 75


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteWeightsError(RuntimeError):
    pass


def ddp_config(parallel: ParallelConfig, use_distributed_optimizer: bool) -> DistributedDataParallelConfig:
    """megatron's DDP settings: gradients reduced in fp32, communication as configured."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=parallel.overlap_grad_reduce, overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.ddp_bucket_size, average_in_collective=parallel.average_in_collective,
    )


def wrap_for_training(
    gpt, cpu_mode: bool, bf16: bool, ddp: DistributedDataParallelConfig | None = None
) -> DistributedDataParallel:
    """A model chunk on its device, in bf16 when asked, in megatron's DDP (fp32 gradients;
    ``ddp``: the settings of :func:`ddp_config`, by default no overlap)."""
    if not cpu_mode:
        gpt.cuda(torch.cuda.current_device())
    module = Float16Module(gpt.config, gpt) if bf16 else gpt
    gpt.config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(gpt.config, ddp or DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)


def hook_communication(models: list[DistributedDataParallel], ddp: DistributedDataParallelConfig) -> None:
    """Tell megatron's schedules how to drive overlapped communication (as Megatron-LM's
    training loop does): hold gradient reduction back until a micro-batch group's last
    backward, and start each chunk's reduction as soon as its backward is done."""
    if not ddp.overlap_grad_reduce:
        return
    config = models[0].config  # shared by every chunk

    def one_or_list(functions):
        return functions[0] if len(functions) == 1 else functions

    config.no_sync_func = one_or_list([model.no_sync for model in models])
    config.grad_sync_func = one_or_list([model.start_grad_sync for model in models])


@contextlib.contextmanager
def parameters_in_sync(models: list[DistributedDataParallel], ddp: DistributedDataParallelConfig):
    """With overlapped parameter gathering, parameters are complete only once the next
    forward has gathered them: validation and saving gather them first, and the hooks
    return afterwards (Megatron-LM's disable/enable_forward_pre_hook)."""
    if not ddp.overlap_param_gather:
        yield
        return
    for model in models:
        model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for model in models:
            model.enable_forward_pre_hook()


def use_deterministic_kernels() -> None:
    """torch's deterministic algorithms (an error names any op without one). cuBLAS needs a
    fixed workspace for repeatable GEMMs; it reads the variable when CUDA first uses it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


class Trainer:
    def __init__(self, config: RunConfig, plan: RunPlan | None = None) -> None:
        """``plan``: :func:`plan_run` of ``config`` for this world size, made here if not given
        (every check runs before any process group or accelerator is touched)."""
        stop_request.install()  # the entry point did already; a trainer built by a test may not
        self.plan = plan or plan_run(config, int(os.environ.get("WORLD_SIZE", "1")))
        config = self.config = self.plan.config
        self.run_dir = Path(config.run_dir)
        p = config.parallel
        if config.training.deterministic:
            use_deterministic_kernels()
        initialize_parallel(
            tensor_parallel=p.tensor, pipeline_parallel=p.pipeline, expert_parallel=p.expert,
            virtual_pipeline_parallel=p.virtual_pipeline, seed=config.seed, cpu_mode=p.cpu_mode,
        )
        self.is_logging_rank = dist.get_rank() == dist.get_world_size() - 1
        self.metrics = MetricsLogger(config.logging, self.run_dir, to_dict(config), self.is_logging_rank)
        self.lock = _lock_run_dir(self.run_dir, self.metrics)
        self.metrics.print(describe(self.plan))
        self.geometry = self.plan.geometry
        self.bf16 = config.bf16
        # What this job runs, null defaults decided: saved with every checkpoint.
        self.resolved = dataclasses.replace(config, training=dataclasses.replace(config.training, bf16=self.bf16))
        if self.is_logging_rank:
            write_durably(self.run_dir / "config.yaml", resolved_config_yaml(self.resolved))
        # One chunk per virtual pipeline stage; checkpoints and statistics see them as one.
        self.chunks = build_model(config.model, p, bf16=self.bf16, deterministic=config.training.deterministic)
        self.ddp = ddp_config(p, config.optim.use_distributed_optimizer)
        self.models = [wrap_for_training(chunk, p.cpu_mode, self.bf16, self.ddp) for chunk in self.chunks]
        hook_communication(self.models, self.ddp)
        self.optimizer, self.scheduler = build_optimizer(
            self.models, config.optim, bf16=self.bf16, train_iters=self.geometry.train_iters,
            override_scheduler=config.checkpoint.override_scheduler,
        )
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", config.checkpoint, self.chunks, self.optimizer, self.scheduler
        )
        self.state = self._restore()
        self.metrics.open(self.state.iteration)
        self._nonfinite_in_a_row = 0
        self.stop_agreed = False  # set by every step's collective (_agree)
        if self.complete:
            self.train_iterator = None  # nothing to train: no data to read (it may be used up)
            return

        g = self.geometry
        self.train_data, self.valid_data = build_gpt_datasets(
            config.data, seq_length=g.seq_length, tokenizer=load_tokenizer(config.data.tokenizer_model),
            train_samples=g.train_iters * g.global_batch_size,
            valid_samples=config.training.eval_iters * g.global_batch_size,
            test_samples=0, seed=config.seed if config.data.seed is None else config.data.seed,
            is_built_on_rank=_reads_data,
        )[:2]
        self.train_iterator = self._batches(self.train_data, self.state.consumed_samples)

    @property
    def complete(self) -> bool:
        return self.state.iteration >= self.geometry.train_iters

    def _restore(self) -> TrainState:
        ckpt = self.config.checkpoint
        if ckpt.resume:
            iteration, warnings = self.checkpointer.select()
            for warning in warnings:
                self.metrics.print(warning)
            if iteration is not None:
                state = self.checkpointer.load(iteration, self.resolved)
                self.metrics.print(
                    f"resumed from {self.checkpointer.directory} at iteration {state.iteration}\n"
                    + resume_report(self.checkpointer.saved_config(iteration), to_dict(self.resolved),
                                    ckpt, state.consumed_samples)
                )
                return state
        elif saved_iterations(self.checkpointer.directory):
            self.metrics.print(
                f"WARNING: checkpoint.resume=false: starting at iteration 0; this run's saves "
                f"replace the checkpoints in {self.checkpointer.directory}"
            )
        if ckpt.init_from:
            # The weights only; the newest checkpoint there, which must verify.
            source = Checkpointer(ckpt.init_from, CheckpointConfig(on_damaged="stop"), self.chunks)
            iteration, _ = source.select()
            if iteration is None:
                raise CheckpointError(f"checkpoint.init_from={ckpt.init_from}: no checkpoint there")
            source.load(iteration, self.resolved)
            self.metrics.print(f"initialised weights from {ckpt.init_from} (new run, iteration 0)")
        return TrainState()

    def _batches(self, dataset, consumed_samples: int):
        """One iterator per model chunk over the same micro-batches (the interleaved
        schedule advances each chunk's own); None for a chunk that neither embeds tokens nor
        computes the loss (it works on the activations it receives), as Megatron-LM does."""
        iterators = [
            build_data_iterator(
                dataset, consumed_samples=consumed_samples,
                micro_batch_size=self.geometry.micro_batch_size,
                dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(),
                num_workers=self.config.data.num_workers,
            ) if chunk.pre_process or chunk.post_process else None
            for chunk in self.chunks
        ]
        return iterators if len(iterators) > 1 else iterators[0]

    @property
    def _device(self) -> torch.device:
        return torch.device("cpu") if self.config.parallel.cpu_mode else torch.device("cuda")

    def _agree(self, losses: list[dict]) -> tuple[float, bool]:
        """Collective, and the step's one host synchronisation: the mean lm loss over
        micro-batches and data-parallel ranks (NaN without losses), and whether any rank
        received a stop signal (each rank then finishes the same step; all stop together)."""
        total = torch.zeros(3, device=self._device)
        # Losses live on the last pipeline stage, identical across its TP ranks: count one.
        if losses and parallel_state.get_tensor_model_parallel_rank() == 0:
            total[0] = torch.stack([item["lm loss"] for item in losses]).sum()
            total[1] = len(losses)
        total[2] = 1.0 if stop_request.signal else 0.0
        dist.all_reduce(total)
        loss, stops = torch.stack([total[0] / total[1], total[2]]).tolist()
        return loss, stops > 0

    def train_step(self) -> dict:
        g = self.geometry
        for model in self.models:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        start, cpu_start = time.perf_counter(), time.process_time()
        losses = get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=self.train_iterator,
            model=self.models, num_microbatches=g.num_microbatches, seq_length=g.seq_length,
            micro_batch_size=g.micro_batch_size, forward_only=False,
        )
        loss, self.stop_agreed = self._agree(losses)
        self.state.consumed_samples += g.global_batch_size
        self.state.iteration += 1
        if not math.isfinite(loss):
            return self._skip_nonfinite(loss)
        self._nonfinite_in_a_row = 0
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        elapsed = time.perf_counter() - start
        return {
            # This process's CPU time (all its threads): comparable between runs on a
            # machine shared with other work, where wall time is not.
            "step_cpu_time_s": time.process_time() - cpu_start,
            "lm_loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "step_time_s": elapsed,
        }

    def _skip_nonfinite(self, loss: float) -> dict:
        self.state.skipped_nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        limit = self.config.training.max_nonfinite_steps
        self.metrics.print(
            f"iteration {self.state.iteration}: lm loss is {loss}; step skipped "
            f"({self._nonfinite_in_a_row} in a row, limit {limit})"
        )
        if self._nonfinite_in_a_row >= limit:
            latest = self.checkpointer.latest_iteration()
            resume = (
                f"the last checkpoint is iteration {latest} in {self.checkpointer.directory}"
                if latest is not None else f"no checkpoint was saved in {self.checkpointer.directory}"
            )
            raise NonFiniteLossError(
                f"{self._nonfinite_in_a_row} consecutive steps with a non-finite loss (limit "
                f"training.max_nonfinite_steps={limit}); stopping at iteration "
                f"{self.state.iteration}; {resume}."
            )
        return {"lm_loss": loss, "skipped": True}

    def evaluate(self) -> dict:
        """Validation lm loss, with the training capacity; with ``training.eval_dropless``
        also dropless (``lm_loss_dropless``), as the HF inference code routes."""
        with parameters_in_sync(self.models, self.ddp):
            results = {"lm_loss": self._validation_loss()}
            if self.config.training.eval_dropless:
                config = self.chunks[0].config
                if has_capacity(config):
                    with dropless(config):
                        results["lm_loss_dropless"] = self._validation_loss()
                else:
                    results["lm_loss_dropless"] = results["lm_loss"]
        return results

    @torch.no_grad()
    def _validation_loss(self) -> float:
        for model in self.models:
            model.eval()
        g = self.geometry
        data = self._batches(self.valid_data, 0)
        losses = []
        try:
            for _ in range(self.config.training.eval_iters):
                losses += get_forward_backward_func()(
                    forward_step_func=gpt_forward_step, data_iterator=data, model=self.models,
                    num_microbatches=g.num_microbatches, seq_length=g.seq_length,
                    micro_batch_size=g.micro_batch_size, forward_only=True,
                )
        finally:
            _close(data)
        for model in self.models:
            model.train()
        return self._agree(losses)[0]

    def _moe_metrics(self, steps: int) -> dict:
        scale = 1.0 / (steps * self.geometry.num_microbatches)
        aux = collect_aux_losses(self.chunks[0].config)
        stats = collect_routing_statistics(
            self.chunks,
            reduce_group=routing_statistics_group(self.chunks[0].config),
            pipeline_group=parallel_state.get_pipeline_model_parallel_group(),
        )
        # Every per-layer metric keyed by layer_number, for the MoE layers only (the aux-loss
        # lists hold every layer, indexed from 0).
        return {
            **{
                name: {layer_key(s.layer): values[s.layer - 1] * scale for s in stats}
                for name, values in aux.items()
            },
            "routing": {
                layer_key(s.layer): {
                    "picked": dataclasses.asdict(s.picked),
                    "kept": dataclasses.asdict(s.kept),
                    "dropped_fraction": s.dropped_fraction,
                }
                for s in stats
            },
        }

    def _measured_flops_per_token(self, moe_metrics: dict) -> float:
        """Training model FLOPs per token with the FFN experts that really ran (after
        capacity dropping), averaged over the MoE layers."""
        kept = [layer["kept"]["ffn_experts_per_token"] for layer in moe_metrics["routing"].values()]
        measured = sum(kept) / len(kept) if kept else None
        return training_flops_per_token(self.config.model, self.config.parallel, measured)

    def save(self) -> None:
        with parameters_in_sync(self.models, self.ddp):
            self._check_weights_finite()
            path = self.checkpointer.save(self.state.iteration, self.state, self.resolved)
        self.metrics.print(f"saved checkpoint {path}")

    def _check_weights_finite(self) -> None:
        # Skipped steps never update the weights, so non-finite weights mean damage that
        # got past verification: never let them replace the last good checkpoint.
        # One reduction on the device, one host sync (not one per tensor).
        finite = torch.stack([torch.isfinite(param).all() for param in self.chunks.parameters()])
        bad = (~finite).sum(dtype=torch.float32).reshape(1).to(self._device)
        dist.all_reduce(bad)
        if bad.item():
            latest = self.checkpointer.latest_iteration()
            raise NonFiniteWeightsError(
                f"iteration {self.state.iteration}: {int(bad.item())} weight tensor(s) hold NaN/Inf; "
                f"not saving over the last good checkpoint (iteration {latest} in "
                f"{self.checkpointer.directory})"
            )

    def run(self) -> int:
        """Train to the end (exit code 0) or until stopped early with a checkpoint
        (EXIT_PREEMPTED), and tell the launching script how it ended (``complete`` or
        ``stopped``). A launcher that reads the outcome gets exit code 0 for both: torchrun
        turns a non-zero code into a failure report, which a stop is not."""
        try:
            code = self._train()
            if write_outcome("complete" if self.complete else "stopped"):
                return 0
            return code
        finally:
            self.close()

    def close(self) -> None:
        """Stop the data-loader workers, close the metric writers, release the run directory."""
        _close(self.train_iterator)
        self.metrics.close()
        self.lock.release()

    def _train(self) -> int:
        cfg, g = self.config, self.geometry
        if self.complete:
            self.metrics.print(f"the run is complete: iteration {self.state.iteration} of "
                               f"{g.train_iters} (checkpoints in {self.checkpointer.directory}); nothing to do")
            return 0
        if self._agree([])[1]:
            self.metrics.print(f"{stop_request.signal} arrived during start-up: stopping at iteration "
                               f"{self.state.iteration} before training")
            return EXIT_PREEMPTED
        self.metrics.print(f"training iterations {self.state.iteration + 1} to {g.train_iters}")
        last_saved, since_log, job_start = self.state.iteration, 0, self.state.iteration
        progress = Progress(
            self.state.iteration, g.train_iters, g.global_batch_size * g.seq_length, dist.get_world_size(),
            peak_flops=None if cfg.parallel.cpu_mode else peak_flops(torch.cuda.get_device_name()),
        )
        valid, losses = None, []
        while self.state.iteration < g.train_iters:
            result = self.train_step()
            if "step_time_s" in result:  # not a skipped step
                progress.step_done(result["step_time_s"])
            since_log += 1
            it = self.state.iteration
            if it % cfg.logging.interval == 0 or it == g.train_iters:
                moe = self._moe_metrics(since_log)
                record = {**result, "consumed_tokens": self.state.consumed_samples * g.seq_length,
                          **progress.interval(it, self._measured_flops_per_token(moe)), **moe}
                self.metrics.log(it, record)
                self.metrics.print(_summary_line(it, g.train_iters, record))
                if not record.get("skipped"):
                    losses.append(record["lm_loss"])
                since_log = 0
            if it % cfg.training.eval_interval == 0 or it == g.train_iters:
                valid = self.evaluate()
                self.metrics.log(it, valid, prefix="valid")
                self.metrics.print(f"iteration {it}: validation " + ", ".join(
                    f"{name.replace('_', ' ')} {value:.4f}" for name, value in valid.items()))
            if it % cfg.checkpoint.save_interval == 0:
                self.save()
                last_saved = it
            stop = self.stop_agreed
            budget = cfg.training.exit_after_iters
            if stop or (budget is not None and it - job_start >= budget):
                if last_saved != it:
                    self.save()
                why = stop_request.signal if stop else f"training.exit_after_iters={budget}"
                self.metrics.print(f"stopping at iteration {it} ({why}); run the same command again to "
                                   f"continue from the checkpoint")
                return EXIT_PREEMPTED
        if last_saved != self.state.iteration:
            self.save()
        self.metrics.print(self._end_of_run(progress, valid, losses))
        return 0

    def _end_of_run(self, progress: Progress, valid: dict | None, losses: list[float]) -> str:
        lines = [f"run complete: iteration {self.state.iteration} of {self.geometry.train_iters}, "
                 f"{format_count(self.state.consumed_samples * self.geometry.seq_length)} tokens; this job "
                 f"{format_duration(time.monotonic() - progress.started)}"]
        if losses:
            lines.append(f"  train lm loss   {losses[0]:.4f} -> {losses[-1]:.4f} (this job's first and last log)")
        if valid:
            lines.append("  validation      " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in valid.items()))
        if self.state.skipped_nonfinite_steps:
            lines.append(f"  skipped steps   {self.state.skipped_nonfinite_steps} (non-finite loss)")
        lines += [f"  checkpoint      {self.checkpointer.directory} (iteration {self.state.iteration})",
                  f"  metrics         {self.run_dir / 'metrics.jsonl'}; plots: moepp-plot {self.run_dir}"]
        return "\n".join(lines)


def _lock_run_dir(run_dir: Path, metrics: MetricsLogger) -> RunDirLock:
    """The first rank takes the run directory's lock; every rank raises if it could not."""
    lock = RunDirLock(run_dir)
    outcome = [None, None]  # (warning, error)
    if dist.get_rank() == 0:
        try:
            outcome[0] = lock.acquire()
        except RuntimeError as e:
            outcome[1] = str(e)
    dist.broadcast_object_list(outcome, src=0)
    warning, error = outcome
    if error is not None:
        raise RunDirLockedError(error)
    if warning is not None:
        metrics.print(warning)
    return lock


def _reads_data() -> bool:
    """Only the first and last pipeline stages read batches (tokens; labels and loss mask):
    inner stages build no datasets and start no data-loader workers."""
    return parallel_state.is_pipeline_first_stage(ignore_virtual=True) or parallel_state.is_pipeline_last_stage(
        ignore_virtual=True)


def _close(batches) -> None:
    """Stop the DataLoader workers of an iterator, or of the iterators of the model chunks."""
    for iterator in batches if isinstance(batches, list) else [batches]:
        if iterator is not None:
            iterator.close()


def _summary_line(iteration: int, train_iters: int, record: dict) -> str:
    if record.get("skipped"):
        return f"iteration {iteration}: skipped (non-finite loss)"
    lb = list(record.get("load_balancing_loss", {}).values())
    width = len(str(train_iters))
    return (
        f"iteration {iteration:{width}d}/{train_iters} | lm loss {record['lm_loss']:.4f} | "
        f"lr {record['lr']:.3e} | grad norm {record['grad_norm']:.3f} | "
        f"lb loss {sum(lb) / max(len(lb), 1):.4f} | {record['tokens_per_s']:.0f} tok/s | "
        f"{progress_text(record)}"
    )
