"""The study's typed config (``configs/study/*.yaml``, loaded like run configs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Variant:
    """One model of the comparison: dotted overrides of the study's run config."""

    name: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class StudyConfig:
    name: str = "main"
    corpus: Literal["full", "quick"] = "full"
    # The run config every variant starts from (relative to this file's directory).
    run_config: str = "model.yaml"
    # Overrides for every run (after run_config, before the variant's).
    overrides: list[str] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    # Model seeds; every run reads the same tokens in the same order (data.seed).
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    data_seed: int = 1234
    # Ratios (expert compute, step time) are relative to this variant, seed by seed.
    reference: str = "vanilla"
    # Runs side by side, each a single process with this many torch threads.
    parallel_runs: int = 2
    threads_per_run: int = 1

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"study {self.name}: variants need distinct names, got {names}")
        if self.reference not in names:
            raise ValueError(f"study {self.name}: reference {self.reference!r} is not a variant ({names})")
        if not self.seeds:
            raise ValueError(f"study {self.name}: seeds is empty")
