"""What the training log says about progress: elapsed time, ETA, tokens consumed of the
target, model TFLOP/s per process and, on GPUs with a known peak, MFU; and the end-of-run
summary. Pure bookkeeping on numbers the trainer hands in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from moepp_megatron.model.size import format_count


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class Progress:
    """Wall-clock progress of this job (a resumed run counts from its own start)."""

    start_iteration: int
    train_iters: int
    tokens_per_step: int
    processes: int
    # The device's peak FLOP/s (None: no MFU).
    peak_flops: float | None = None
    started: float = field(default_factory=lambda: time.monotonic())

    def __post_init__(self) -> None:
        self._last_time, self._last_iteration = self.started, self.start_iteration
        self._steps, self._step_seconds = 0, 0.0

    def step_done(self, seconds: float) -> None:
        """A training step (forward, backward, optimizer) took ``seconds``."""
        self._steps += 1
        self._step_seconds += seconds

    def interval(self, iteration: int, flops_per_token: float) -> dict:
        """Metrics since the previous call (or the job's start), given the model FLOPs of
        one training token: throughput over the steps' own time, the ETA over the wall time
        per iteration (validation and checkpoints included)."""
        now = time.monotonic()
        iterations = iteration - self._last_iteration
        wall_per_iteration = (now - self._last_time) / iterations if iterations else 0.0
        tokens_per_s = self._steps * self.tokens_per_step / self._step_seconds if self._step_seconds else 0.0
        self._last_time, self._last_iteration = now, iteration
        self._steps, self._step_seconds = 0, 0.0
        flops = flops_per_token * tokens_per_s / self.processes
        metrics = {
            "tokens_per_s": tokens_per_s,
            "elapsed_s": now - self.started,
            "eta_s": (self.train_iters - iteration) * wall_per_iteration,
            "target_tokens": self.train_iters * self.tokens_per_step,
            "model_tflops_per_s": flops / 1e12,
        }
        if self.peak_flops:
            metrics["mfu"] = flops / self.peak_flops
        return metrics


def progress_text(record: dict) -> str:
    """The progress half of a log line."""
    text = (f"{format_count(record['consumed_tokens'])}/{format_count(record['target_tokens'])} tokens | "
            f"{record['model_tflops_per_s']:.3g} TFLOP/s")
    if "mfu" in record:
        text += f" | MFU {record['mfu']:.1%}"
    return (text + f" | elapsed {format_duration(record['elapsed_s'])} | "
            f"ETA {format_duration(record['eta_s'])}")
