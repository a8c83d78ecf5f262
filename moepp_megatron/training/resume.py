"""What a resumed run keeps from its checkpoint and what changed in the config since, said
at start-up: a changed LR, schedule length or data blend is otherwise silently ignored
(the schedule) or silently accepted (the data)."""

from __future__ import annotations

from moepp_megatron.config.schema import CheckpointConfig

# Settings the LR scheduler's state holds (megatron's OptimizerParamScheduler), and those
# that derive the schedule's length.
SCHEDULE_KEYS = (
    "optim.lr", "optim.min_lr", "optim.warmup_iters", "optim.decay_style", "optim.decay_iters",
    "optim.weight_decay", "training.train_iters", "training.train_tokens",
    "training.global_batch_tokens",
)
# Settings that decide which samples come next: the resumed run continues at the saved
# sample position of the new order, so nothing is replayed or skipped on purpose.
DATA_ORDER_KEYS = ("seed", "data", "training.global_batch_tokens")
# Where the run is and how it resumes, not what it trains (model changes are refused
# before this: checkpointing.check_model_config).
IGNORED = ("run_dir", "model", "checkpoint")


def changed_settings(saved: dict, current: dict) -> dict[str, tuple]:
    """dotted key -> (checkpoint's value, this run's value) for every setting that differs."""
    changes = {}

    def walk(a, b, path):
        if any(path == key or path.startswith(key + ".") for key in IGNORED):
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            changes[path] = (a, b)

    walk(saved, current, "")
    return changes


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_report(saved: dict, current: dict, ckpt: CheckpointConfig, consumed_samples: int) -> str:
    """The start-up lines of a resumed run."""
    kept = ["weights", "LR schedule position", "data position"]
    kept += ["optimizer state"] if ckpt.load_optimizer else []
    kept += ["RNG states"] if ckpt.load_rng else []
    lines = [f"kept from the checkpoint: {', '.join(kept)}"]
    fresh = [name for name, on in (("optimizer state", ckpt.load_optimizer), ("RNG states", ckpt.load_rng)) if not on]
    if fresh:
        lines.append(f"fresh (checkpoint.load_optimizer / load_rng = false): {', '.join(fresh)}")
    changes = changed_settings(saved, current)
    if changes:
        lines.append("changed since the checkpoint:")
    for key, (was, now) in changes.items():
        notes = []
        if _under(key, SCHEDULE_KEYS):
            notes.append(
                "LR schedule: the config's (checkpoint.override_scheduler=true)" if ckpt.override_scheduler
                else "LR schedule: the checkpoint's is kept; checkpoint.override_scheduler=true takes the config's"
            )
        if _under(key, DATA_ORDER_KEYS):
            notes.append(f"data: the new order, continuing at sample {consumed_samples}")
        lines.append(f"  {key}: {was!r} -> {now!r}" + "".join(f"  [{n}]" for n in notes))
    return "\n".join(lines)
