"""The process layout's arithmetic and the device requirement, without importing torch or
megatron-core: the launching process checks a config with them in a fraction of a second."""

from __future__ import annotations


class NoCudaError(RuntimeError):
    """No CUDA device, and CPU mode not asked for; the message says what to set."""

    def __init__(self) -> None:
        # MOEPP_CPU_MODE is compat.cpu.CPU_MODE_ENV_VAR (that module imports torch).
        super().__init__("no CUDA device on this machine: to run on CPU with gloo (development only), set "
                         "parallel.cpu_mode=true or MOEPP_CPU_MODE=1")


def check_sizes(
    world_size: int,
    tensor_parallel: int,
    pipeline_parallel: int,
    expert_parallel: int,
    virtual_pipeline_parallel: int | None,
    expert_tensor_parallel: int | None,
) -> None:
    for name, value in (
        ("tensor_parallel", tensor_parallel),
        ("pipeline_parallel", pipeline_parallel),
        ("expert_parallel", expert_parallel),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if virtual_pipeline_parallel is not None:
        if not isinstance(virtual_pipeline_parallel, int) or virtual_pipeline_parallel < 1:
            raise ValueError(
                "virtual_pipeline_parallel must be None or a positive int, got "
                f"{virtual_pipeline_parallel!r}"
            )
        if virtual_pipeline_parallel > 1 and pipeline_parallel < 2:
            raise ValueError(
                "virtual_pipeline_parallel > 1 requires pipeline_parallel > 1, got "
                f"pipeline_parallel={pipeline_parallel}"
            )
    if expert_tensor_parallel is not None and (
        not isinstance(expert_tensor_parallel, int) or expert_tensor_parallel < 1
    ):
        raise ValueError(
            f"expert_tensor_parallel must be None or a positive int, got {expert_tensor_parallel!r}"
        )

    model_parallel = tensor_parallel * pipeline_parallel
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel ({tensor_parallel}) x "
            f"pipeline_parallel ({pipeline_parallel}) = {model_parallel}"
        )
    etp = tensor_parallel if expert_tensor_parallel is None else expert_tensor_parallel
    expert_model_parallel = etp * expert_parallel * pipeline_parallel
    if world_size % expert_model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by expert_parallel ({expert_parallel}) x "
            f"expert_tensor_parallel ({etp}) x pipeline_parallel ({pipeline_parallel}) = "
            f"{expert_model_parallel}"
        )
