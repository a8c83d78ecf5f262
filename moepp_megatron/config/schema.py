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

    # moepp: N_ffn FFN experts plus zero-computation (ZC) experts behind one router. vanilla:
    # megatron's stock MoE with the same FFN experts (top-k, then a softmax over the k, and
    # its standard load-balance loss); the ZC counts, tau, router, routing, gating_residual
    # and compile_routing are then ignored.
    method: Literal["moepp", "vanilla"] = "moepp"
    # N_ffn, the FFN experts per expert layer (paper presets: 8, 16, 32); megatron's
    # num_moe_experts. Must be divisible by parallel.expert.
    num_ffn_experts: int = 8
    # Hidden (intermediate) size of each SwiGLU FFN expert (paper: 2048; 4096 for the 7B).
    ffn_hidden_size: int = 2048
    # Experts each token picks, counted over all N = N_ffn + N_zc experts (paper: 2).
    topk: int = 2
    # Zero experts, E(x) = 0: the slot is discarded. routing: release needs exactly 1.
    num_zero_experts: int = 1
    # Copy experts, E(x) = x: the token skips the layer in that slot.
    num_copy_experts: int = 1
    # Constant experts, E(x) = a1 x + a2 v, [a1, a2] = softmax(W_c x), each with its own
    # trained v and W_c (paper: 2; 6 for the 2B's 32+8E).
    num_constant_experts: int = 2
    # eta of the ZC experts (FFN experts: 1) in the load-balance loss (Eq. 7) and in the
    # capacity split (Eq. 8); a smaller tau sends more tokens to ZC experts (paper: 0.75).
    tau: float = 0.75
    # The router R(x): linear (the paper: one [N, D] matrix) or mlp (the released MoE++-7B:
    # Linear(D, 8N) -> tanh -> Linear(8N, N)); fp32, no biases.
    router: Literal["linear", "mlp"] = "linear"
    # paper: the gates are the picked experts' softmax probabilities, not renormalised.
    # release (the released MoE++-7B): the zero expert's gate is 0, the other picked gates
    # are renormalised to sum 1, and every expert sees k * x; needs one zero expert.
    routing: Literal["paper", "release"] = "paper"
    # Gating residuals: each MoE++ layer's router logits add W_g times the previous expert
    # layer's logits (also across pipeline stages).
    gating_residual: bool = True
    # gamma of Eq. 8 (paper: 1.1, set by every preset): each FFN expert takes at most
    # gamma * tau * T / (tau * N_ffn + N_zc) of a layer's T = tokens * topk assignments, each
    # ZC expert 1/tau times that; the rest are dropped. null means dropless. For vanilla,
    # megatron's uniform moe_expert_capacity_factor.
    capacity_factor: Optional[float] = None
    # beta, the weight of the load-balance loss in the total loss (paper: 0.01); 0 turns it
    # off. MoE++ uses the heterogeneous loss of Eq. 7, vanilla megatron's standard one.
    aux_loss_coeff: float = 0.01
    # Weight of megatron's router z-loss on the router logits; null = no z-loss (the paper
    # uses none).
    z_loss_coeff: Optional[float] = None
    # megatron's token dispatcher, which moves tokens to the FFN experts on other
    # expert-parallel ranks (ZC experts are computed locally). MoE++ with gating residuals
    # and parallel.pipeline > 1 needs alltoall.
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    # Expert FFNs as grouped GEMMs: Transformer Engine's TEGroupedMLP when TE is installed,
    # else torch._grouped_mm (CPU; CUDA needs Hopper and bf16), else SequentialMLP (with a
    # warning). false: SequentialMLP, one GEMM pair per expert.
    grouped_gemm: bool = False
    # torch.compile the MoE++ routing and ZC experts; null = on for GPU runs, off in CPU mode.
    compile_routing: Optional[bool] = None
    # Which layers are expert layers (megatron's moe_layer_freq): an int N makes every N-th
    # layer one (layers 0, N, 2N, ...; 1 = all); a list of 0/1, one per layer, picks them.
    # The others are dense SwiGLU layers of model.ffn_hidden_size.
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

    # Transformer layers (paper: 12; 24 for the 7B).
    num_layers: int = 12
    # Model width D (paper: 768; 1536 for the 7B).
    hidden_size: int = 768
    # Attention heads (paper: 12; 16 for the 7B).
    num_attention_heads: int = 12
    # Size of each attention head (megatron's kv_channels); need not be hidden_size divided
    # by the heads (the 7B: 16 heads of 96 in a width of 1536).
    head_dim: int = 64
    # Key/value head groups for grouped-query attention; must divide num_attention_heads.
    # null = one per head (multi-head attention, as in the paper).
    num_query_groups: Optional[int] = None
    # FFN size of dense layers (those that layer_freq leaves without experts).
    ffn_hidden_size: int = 2048
    # Tokens per training sequence, and the longest sequence the model is built for
    # (paper: 2048).
    seq_length: int = 2048
    # Embedding and output rows when a model is built from this section alone (benchmarks,
    # Hugging Face conversion). moepp-train replaces it with the tokenizer's vocabulary
    # padded to data.vocab_size_divisible_by * parallel.tensor.
    vocab_size: int = 32000
    # RoPE base theta (paper: 10000); truncated to an integer for megatron.
    rope_base: float = 10000.0
    # RMSNorm epsilon (paper: 1e-6).
    norm_eps: float = 1e-6
    # Standard deviation of the normal initialisation of the weight matrices.
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
        freq = self.moe.layer_freq
        if isinstance(freq, list):
            _require(
                len(freq) == self.num_layers and set(freq) <= {0, 1},
                "model.moe.layer_freq",
                f"a list needs one 0/1 per layer ({self.num_layers}), got {freq}",
            )
        else:
            _require(freq >= 1, "model.moe.layer_freq", f"must be >= 1, got {freq}")


@dataclass
class ParallelConfig:
    """Process layout. The product tensor * pipeline * data must equal the world size."""

    # Tensor-parallel size: each layer's matrices are split over this many ranks.
    tensor: int = 1
    # Pipeline-parallel size: the layers are split into this many stages (paper 7B: 8).
    pipeline: int = 1
    # Expert-parallel size: the FFN experts are split over this many ranks (the ZC experts
    # are replicated on every rank); must divide model.moe.num_ffn_experts.
    expert: int = 1
    # Model chunks per pipeline rank for the interleaved schedule; null = one (no
    # interleaving).
    virtual_pipeline: Optional[int] = None
    # Uneven pipeline splits: layers of the first stage; null = an even split.
    first_stage_layers: Optional[int] = None
    # Uneven pipeline splits: layers of the last stage; null = an even split.
    last_stage_layers: Optional[int] = None
    # megatron's sequence parallelism: activations outside the tensor-parallel matrices are
    # split along the sequence over the tensor-parallel ranks. Needs tensor > 1.
    sequence_parallel: bool = False
    # Activation recomputation: null, "full" or "selective" (then recompute_modules applies).
    recompute: Optional[Literal["full", "selective"]] = None
    # With recompute: selective, the modules whose activations are recomputed in the
    # backward pass (megatron's recompute_modules: core_attn, mlp, moe, moe_act, layernorm).
    recompute_modules: list[str] = field(default_factory=lambda: ["moe"])
    # Reduce gradients bucket by bucket while backward still runs (megatron DDP's
    # overlap_grad_reduce), instead of all at once after it.
    overlap_grad_reduce: bool = False
    # With optim.use_distributed_optimizer: gather each bucket's updated parameters during
    # the next forward pass (megatron DDP's overlap_param_gather), instead of right after the
    # optimizer step.
    overlap_param_gather: bool = False
    # Parameters per gradient-communication bucket; null = megatron's default,
    # max(40M, 1M x data-parallel size).
    ddp_bucket_size: Optional[int] = None
    # Average gradients inside the collective (one operation) instead of dividing by the
    # data-parallel size before a sum.
    average_in_collective: bool = False
    # Run on CPU with gloo (development and tests); MOEPP_CPU_MODE=1 sets it too. Refused
    # when CUDA is available.
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
    """One weighted corpus: a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

    An entry of ``data.sources``, of ``data.valid_sources`` or of a mixture file's
    ``sources:`` list.
    """

    # Path of the dataset without ``.bin`` / ``.idx`` (moepp-preprocess's --output-prefix);
    # a relative one is taken from data.root.
    prefix: str
    # Sampling weight in the blend, relative to the other sources (normalised to sum 1).
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.weight > 0, f"data source {self.prefix!r}: weight", "must be > 0")


@dataclass
class DataConfig:
    """Training data: a sentencepiece tokenizer and a weighted blend of indexed datasets.

    Sources come from ``mixture`` (a YAML file with a ``sources:`` list, see
    ``configs/data/``) or inline ``sources``; relative prefixes are taken from ``root``.
    """

    # The sentencepiece model file. moepp-train needs it (vocabulary size, end-of-document
    # token); moepp-convert to-hf writes the Hugging Face tokenizer from it by default.
    tokenizer_model: Optional[str] = None
    # Directory that relative source prefixes (inline or in the mixture file) are taken
    # from; "" = the working directory.
    root: str = ""
    # A YAML file with a ``sources:`` list (see configs/data/); a relative path is taken
    # from the working directory, else from the package (configs/data/mix-s1.yaml is
    # packaged). Give either this or ``sources``.
    mixture: Optional[str] = None
    # The training blend inline: a list of {prefix, weight}. Give either this or
    # ``mixture``.
    sources: list[DataSource] = field(default_factory=list)
    # train / valid / test proportions of every source, as megatron's "split" string.
    split: str = "98,1,1"
    # Held-out validation data: with these, training reads all of ``sources`` / ``mixture``
    # and validation reads these (megatron's blend_per_split); ``split`` is then unused.
    valid_sources: list[DataSource] = field(default_factory=list)
    # Seed of the sample order; null = the run's seed. Fix it to train several seeds of a
    # model on the same tokens in the same order.
    seed: Optional[int] = None
    # Leave end-of-document tokens out of the loss (megatron's eod_mask_loss).
    eod_mask_loss: bool = False
    # megatron writes its sample/shuffle index files here; null = ``<run_dir>/data_cache``.
    cache_dir: Optional[str] = None
    # Data-loader worker processes per rank; 0 reads in the training process.
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
    """AdamW with a warmup + decay schedule (docs/MOEPP_SPEC.md section 3, paper Table B)."""

    # Peak learning rate, reached at the end of warmup (paper: 5e-4; 1e-4 for strategy 3).
    lr: float = 5e-4
    # Learning rate at the end of the decay, and after it (paper: 5e-5; 1e-5 for strategy
    # 3); in [0, lr].
    min_lr: float = 5e-5
    # AdamW's decoupled weight decay, constant over the run (paper: 0.1); megatron exempts
    # biases and 1-D parameters (norm weights, constant-expert vectors).
    weight_decay: float = 0.1
    # Adam beta1.
    adam_beta1: float = 0.9
    # Adam beta2.
    adam_beta2: float = 0.95
    # Adam epsilon.
    adam_eps: float = 1e-8
    # Clip the global gradient L2 norm to this (paper: 1.0); 0 = no clipping.
    clip_grad: float = 1.0
    # megatron's distributed optimizer: optimizer state and main parameters sharded over the
    # data-parallel ranks.
    use_distributed_optimizer: bool = False
    # Iterations of linear warmup from warmup_init_lr to lr (paper: 2000; 500 and 200 for
    # the 7B's strategies 2 and 3); must be smaller than the decay length.
    warmup_iters: int = 2000
    # Linear warmup starts here (the paper: 1e-7).
    warmup_init_lr: float = 1e-7
    # Shape of the decay from lr to min_lr after warmup (paper: cosine).
    decay_style: Literal["cosine", "linear", "constant", "inverse-square-root"] = "cosine"
    # Iterations over which the LR decays to min_lr, counted from iteration 0 (warmup
    # included); null = all of training.
    decay_iters: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        _require(self.warmup_iters >= 0, "optim.warmup_iters", "must be >= 0")


@dataclass
class TrainingConfig:
    """Batch and length of training. The paper states both in tokens."""

    # Training length in tokens, rounded down to whole iterations (paper: 100B; 900B and
    # 100B for the 7B's strategies 2 and 3). Set exactly one of train_tokens / train_iters.
    train_tokens: Optional[int] = None
    # Training length in iterations (optimizer steps). 1000 when no file sets a training
    # section; a file that does must set exactly one of train_tokens / train_iters.
    train_iters: Optional[int] = None
    # Tokens per optimizer step; a multiple of model.seq_length whose sequences split into
    # micro-batches on every data-parallel rank. Paper: 4M = 2048 sequences of 2048 tokens.
    global_batch_tokens: int = 4_194_304
    # Sequences per micro-batch on each data-parallel rank; gradients accumulate over the
    # micro-batches of a step.
    micro_batch_size: int = 1
    # Validate every this many iterations, and at the last one.
    eval_interval: int = 1000
    # Global batches of validation data per validation.
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
    # Save and stop after this many iterations of this job (a step budget for one
    # allocation); null = no budget.
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

    # Save every this many iterations; also at the end of training and when the job stops
    # (signal, exit_after_iters).
    save_interval: int = 1000
    # Complete checkpoints kept; older ones are deleted after a save.
    keep_last: int = 3
    # Resume from the run directory's newest checkpoint whose files verify, if any; false
    # starts at iteration 0 and this run's saves replace its checkpoints.
    resume: bool = True
    # Resume from this iteration's checkpoint instead (it must verify); null = the newest.
    load_iteration: Optional[int] = None
    # The newest checkpoint fails verification: resume from the one before it with a
    # warning naming the damaged file (fallback), or stop with that message (stop).
    on_damaged: Literal["fallback", "stop"] = "fallback"
    # Resume with the checkpoint's optimizer state (Adam moments); false starts them fresh
    # (the LR schedule and the data position are always kept).
    load_optimizer: bool = True
    # Resume with the checkpoint's RNG states; false starts fresh random streams.
    load_rng: bool = True
    # The LR schedule's settings (optim.lr, min_lr, warmup, decay, the run's length) from
    # this config instead of the checkpoint; the schedule's step count is kept.
    override_scheduler: bool = False
    # Initialise a new run (iteration 0, fresh optimizer) from the weights of the newest
    # checkpoint in this directory, which must verify (another run's ``checkpoints/``, or
    # the output of moepp-convert from-hf); unused when the run resumes from its own.
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.save_interval >= 1, "checkpoint.save_interval", "must be >= 1")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _require(self.load_iteration is None or self.load_iteration >= 0,
                 "checkpoint.load_iteration", "must be >= 0")


@dataclass
class LoggingConfig:
    """Training metrics: stdout and ``<run_dir>/metrics.jsonl`` always, TensorBoard and
    Weights & Biases optionally; only one rank writes."""

    # Log the training metrics every this many iterations, and at the last one.
    interval: int = 10
    # Write TensorBoard event files to ``<run_dir>/tensorboard``.
    tensorboard: bool = True
    # Log to Weights & Biases too (``pip install wandb``), its files under run_dir.
    wandb: bool = False
    # The W&B project; the run is named after run_dir's last component.
    wandb_project: str = "moepp-megatron"
    # offline: nothing leaves the machine; sync later with `wandb sync`. online: streams to
    # the W&B server. disabled: no W&B, even with wandb: true.
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class RunConfig:
    """Everything a job needs; each component receives only its own section."""

    # Everything the run writes goes here: ``checkpoints/``, ``metrics.jsonl``,
    # ``tensorboard/``, ``wandb/``, ``run.lock`` and (by default) ``data_cache/``.
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(train_iters=1000))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Seed of the parameter initialisation and megatron's random streams, and of the data
    # order unless data.seed is set.
    seed: int = 1234

    @property
    def bf16(self) -> bool:
        """training.bf16, with null resolved: bf16 on GPU, fp32 in CPU mode."""
        if self.training.bf16 is None:
            return not self.parallel.cpu_mode
        return self.training.bf16
