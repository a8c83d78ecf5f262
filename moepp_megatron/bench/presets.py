"""What the benchmarks run over, importable without torch (the CLI's --help lists them)."""

from dataclasses import dataclass

# The paper's MoE++ presets by the name its tables use.
PRESETS = {
    "0.6B": "moepp-0.6b-8+4e.yaml",
    "1B": "moepp-1b-16+4e.yaml",
    "2B": "moepp-2b-32+8e.yaml",
    "7B": "moepp-7b-16+4e.yaml",
}
# The paper's tau sweep (its Table 4).
TAUS = (0.10, 0.25, 0.50, 0.75, 1.00)


@dataclass(frozen=True)
class PaperRun:
    label: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...] = ()


# The paper's runs on 4 nodes x 8 A100, by scripts/slurm/paper_runs.sh's names and with its
# configs and overrides (tests/slurm/test_paper_runs.py holds them equal); MoE++ at tau 0.75,
# its Table 2's setting. README's table of memory and step time per GPU covers these
# (moepp-bench costs, then report).
PAPER_WORLD_SIZE = 32
PAPER_GPU = "A100"
_S1 = "recipes/strategy1"
PAPER_RUNS = {
    "moepp-0.6b-tau0.75": PaperRun("MoE++ 0.6B (8+4)E", ("moepp-0.6b-8+4e", _S1), ("model.moe.tau=0.75", "parallel.expert=8")),
    "vanilla-0.6b": PaperRun("vanilla 0.6B 8E", ("vanilla-0.6b-8e", _S1), ("parallel.expert=8",)),
    "moepp-1b-tau0.75": PaperRun("MoE++ 1B (16+4)E", ("moepp-1b-16+4e", _S1), ("model.moe.tau=0.75", "parallel.expert=8")),
    "vanilla-1b": PaperRun("vanilla 1B 16E", ("vanilla-1b-16e", _S1), ("parallel.expert=8",)),
    "moepp-2b-tau0.75": PaperRun("MoE++ 2B (32+8)E", ("moepp-2b-32+8e", _S1), ("model.moe.tau=0.75", "parallel.expert=8")),
    "vanilla-2b": PaperRun("vanilla 2B 32E", ("vanilla-2b-32e", _S1), ("parallel.expert=8",)),
    "moepp-7b-s2": PaperRun("MoE++ 7B (16+4)E, strategy 2", ("moepp-7b-16+4e", "recipes/strategy2")),
}
