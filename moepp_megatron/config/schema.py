"""The typed configuration tree: one dataclass per component.

A run is described by one YAML file (see ``configs/``) that maps onto :class:`RunConfig`.
Components receive only the section they use (the model builder gets ``ModelConfig`` and
``ParallelConfig``, never the whole run), so a field's reach is visible from its type.
Checks that need only one section live in its ``__post_init__``; the checks that need
megatron's view of the model live in :mod:`moepp_megatron.moepp.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


@dataclass
class MoEConfig:
    """The expert layers. ``method: vanilla`` is the baseline: no ZC experts, stock router."""

    method: Literal["moepp", "vanilla"] = "moepp"
    num_ffn_experts: int = 8
    ffn_hidden_size: int = 2048
    topk: int = 2
    num_zero_experts: int = 1
    num_copy_experts: int = 1
    num_constant_experts: int = 2
    tau: float = 0.75
    router: Literal["linear", "mlp"] = "linear"
    routing: Literal["paper", "release"] = "paper"
    gating_residual: bool = True
    # gamma of Eq. 8; null means dropless.
    capacity_factor: Optional[float] = None
    aux_loss_coeff: float = 0.01
    z_loss_coeff: Optional[float] = None
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    # Expert FFNs as grouped GEMMs: Transformer Engine's TEGroupedMLP when TE is installed,
    # else torch._grouped_mm (CPU; CUDA needs Hopper and bf16), else SequentialMLP.
    grouped_gemm: bool = False
    # torch.compile the MoE++ routing and ZC experts; null = on for GPU runs, off in CPU mode.
    compile_routing: Optional[bool] = None
    # 1 = every layer is an expert layer; a list of 0/1 per layer mixes in dense layers.
    layer_freq: int | list[int] = 1

    def __post_init__(self) -> None:
        _require(self.method in ("moepp", "vanilla"), "model.moe.method", "must be moepp or vanilla")
        _require(self.num_ffn_experts >= 1, "model.moe.num_ffn_experts", "must be >= 1")
        for name in ("num_zero_experts", "num_copy_experts", "num_constant_experts"):
            _require(getattr(self, name) >= 0, f"model.moe.{name}", "must be >= 0")
        _require(self.topk >= 1, "model.moe.topk", "must be >= 1")
        _require(self.tau > 0, "model.moe.tau", f"must be > 0, got {self.tau}")
        _require(self.router in ("linear", "mlp"), "model.moe.router", "must be linear or mlp")
        _require(self.routing in ("paper", "release"), "model.moe.routing", "must be paper or release")
        _require(
            self.capacity_factor is None or self.capacity_factor > 0,
            "model.moe.capacity_factor",
            "must be > 0 or null (dropless)",
        )

    @property
    def num_zc_experts(self) -> int:
        if self.method == "vanilla":
            return 0
        return self.num_zero_experts + self.num_copy_experts + self.num_constant_experts


@dataclass
class ModelConfig:
    """A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, no biases, untied embeddings)."""

    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    head_dim: int = 64
    num_query_groups: Optional[int] = None
    # FFN size of dense layers (those that layer_freq leaves without experts).
    ffn_hidden_size: int = 2048
    seq_length: int = 2048
    # Padded up for tensor parallelism by the builder; the tokenizer sets it in training runs.
    vocab_size: int = 32000
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "head_dim", "seq_length"):
            _require(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        groups = self.num_query_groups or self.num_attention_heads
        _require(
            self.num_attention_heads % groups == 0,
            "model.num_query_groups",
            f"{groups} does not divide num_attention_heads={self.num_attention_heads}",
        )


@dataclass
class ParallelConfig:
    """Process layout. The product tensor * pipeline * data must equal the world size."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    virtual_pipeline: Optional[int] = None
    # Uneven pipeline splits: layers of the first / last stage (the rest split evenly).
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    sequence_parallel: bool = False
    # Activation recomputation: null, "full" or "selective" (then recompute_modules applies).
    recompute: Optional[Literal["full", "selective"]] = None
    recompute_modules: list[str] = field(default_factory=lambda: ["moe"])
    # Run on CPU with gloo (development and tests). Refused when CUDA is available.
    cpu_mode: bool = False

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "expert"):
            _require(getattr(self, name) >= 1, f"parallel.{name}", "must be >= 1")
        _require(
            self.recompute in (None, "full", "selective"),
            "parallel.recompute",
            "must be null, full or selective",
        )
        _require(
            not (self.sequence_parallel and self.tensor == 1),
            "parallel.sequence_parallel",
            "needs parallel.tensor > 1",
        )


@dataclass
class DataSource:
    """One weighted corpus: a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``)."""

    prefix: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.weight > 0, f"data source {self.prefix!r}: weight", "must be > 0")


@dataclass
class DataConfig:
    """Training data: a sentencepiece tokenizer and a weighted blend of indexed datasets.

    Sources come from ``mixture`` (a YAML file with a ``sources:`` list, see
    ``configs/data/``) or inline ``sources``; relative prefixes are taken from ``root``.
    """

    tokenizer_model: Optional[str] = None
    root: str = ""
    mixture: Optional[str] = None
    sources: list[DataSource] = field(default_factory=list)
    # train / valid / test proportions of every source, as megatron's "split" string.
    split: str = "98,1,1"
    # Held-out validation data: with these, training reads all of ``sources`` / ``mixture``
    # and validation reads these (megatron's blend_per_split); ``split`` is then unused.
    valid_sources: list[DataSource] = field(default_factory=list)
    # Seed of the sample order; null = the run's seed. Fix it to train several seeds of a
    # model on the same tokens in the same order.
    seed: Optional[int] = None
    eod_mask_loss: bool = False
    # megatron writes its sample/shuffle index files here (default: next to the data).
    cache_dir: Optional[str] = None
    num_workers: int = 2
    # The embedding is padded to a multiple of this times the tensor-parallel size.
    vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        _require(
            not (self.mixture and self.sources),
            "data.mixture",
            "give either a mixture file or inline data.sources, not both",
        )


@dataclass
class OptimConfig:
    """AdamW with a warmup + decay schedule (MOEPP_SPEC.md section 3, paper Table B)."""

    lr: float = 5e-4
    min_lr: float = 5e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    warmup_iters: int = 2000
    # Linear warmup starts here (the paper: 1e-7).
    warmup_init_lr: float = 1e-7
    decay_style: Literal["cosine", "linear", "constant", "inverse-square-root"] = "cosine"
    # Iterations over which the LR decays to min_lr (default: all of training).
    decay_iters: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        _require(self.warmup_iters >= 0, "optim.warmup_iters", "must be >= 0")


@dataclass
class TrainingConfig:
    """Batch and length of training. The paper states both in tokens."""

    # One of train_tokens / train_iters; tokens are rounded down to whole iterations.
    train_tokens: Optional[int] = None
    train_iters: Optional[int] = None
    # 4M tokens = 2048 sequences of 2048 tokens; must split into micro-batches per DP rank.
    global_batch_tokens: int = 4_194_304
    micro_batch_size: int = 1
    eval_interval: int = 1000
    eval_iters: int = 10
    # Validate also without capacity (lm_loss_dropless): how the HF inference code routes.
    eval_dropless: bool = False
    # bf16 parameters and activations (fp32 router, main parameters and gradient reduction).
    # null = bf16 on GPU, fp32 in CPU mode; true also works in CPU mode (CPU bf16 matmuls).
    bf16: Optional[bool] = None
    # Deterministic GPU kernels (torch.use_deterministic_algorithms, megatron's
    # deterministic_mode): bitwise-repeatable runs and resumes on GPUs, at some speed cost.
    # CPU runs are deterministic without it.
    deterministic: bool = False
    # Skip steps whose loss is NaN/Inf; stop after this many in a row.
    max_nonfinite_steps: int = 5
    # Stop after this many iterations of this job (a step budget for one allocation).
    exit_after_iters: Optional[int] = None

    def __post_init__(self) -> None:
        _require(
            (self.train_tokens is None) != (self.train_iters is None),
            "training.train_tokens",
            "set exactly one of training.train_tokens and training.train_iters",
        )
        _require(self.micro_batch_size >= 1, "training.micro_batch_size", "must be >= 1")
        _require(self.global_batch_tokens >= 1, "training.global_batch_tokens", "must be >= 1")


@dataclass
class CheckpointConfig:
    """megatron dist_checkpointing (torch_dist) under ``<run_dir>/checkpoints``."""

    save_interval: int = 1000
    keep_last: int = 3
    # Resume from the run directory's newest checkpoint whose files verify, if any.
    resume: bool = True
    # Resume from this iteration's checkpoint instead (it must verify).
    load_iteration: Optional[int] = None
    # The newest checkpoint fails verification: resume from the one before it with a
    # warning naming the damaged file (fallback), or stop with that message (stop).
    on_damaged: Literal["fallback", "stop"] = "fallback"
    # Resume with the checkpoint's optimizer state (Adam moments) and RNG states; false
    # starts them fresh (the LR schedule and the data position are always kept).
    load_optimizer: bool = True
    load_rng: bool = True
    # The LR schedule's settings (optim.lr, min_lr, warmup, decay, the run's length) from
    # this config instead of the checkpoint; the schedule's step count is kept.
    override_scheduler: bool = False
    # Initialise a new run (iteration 0, fresh optimizer) from these weights.
    init_from: Optional[str] = None
    async_save: bool = False

    def __post_init__(self) -> None:
        _require(self.save_interval >= 1, "checkpoint.save_interval", "must be >= 1")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _require(self.load_iteration is None or self.load_iteration >= 0,
                 "checkpoint.load_iteration", "must be >= 0")


@dataclass
class LoggingConfig:
    interval: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "moepp-megatron"
    # offline: nothing leaves the machine; sync later with `wandb sync`.
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class RunConfig:
    """Everything a job needs; each component receives only its own section."""

    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(train_iters=1000))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 1234

    @property
    def bf16(self) -> bool:
        """training.bf16, with null resolved: bf16 on GPU, fp32 in CPU mode."""
        if self.training.bf16 is None:
            return not self.parallel.cpu_mode
        return self.training.bf16
