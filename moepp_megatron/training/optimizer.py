"""megatron's optimizer (AdamW, grad clipping, mixed precision, optional distributed
optimizer) and its OptimizerParamScheduler, from our ``OptimConfig``. The scheduler
counts iterations: warmup from ``warmup_init_lr``, then ``decay_style`` to ``min_lr``."""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from moepp_megatron.config.schema import OptimConfig
from moepp_megatron.training.plan import check_schedule


def build_optimizer(
    model_chunks, optim: OptimConfig, *, bf16: bool, train_iters: int, override_scheduler: bool = False
):
    """``override_scheduler``: a resumed run takes the schedule's settings from ``optim``
    instead of the checkpoint (megatron's override_opt_param_scheduler)."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    check_schedule(optim, train_iters)
    optimizer = get_megatron_optimizer(config, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=optim.warmup_init_lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_iters,
        lr_decay_steps=optim.decay_iters or train_iters,
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
        override_opt_param_scheduler=override_scheduler,
        use_checkpoint_opt_param_scheduler=not override_scheduler,
    )
    return optimizer, scheduler
