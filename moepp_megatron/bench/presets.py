"""What the benchmarks run over, importable without torch (the CLI's --help lists them)."""

# The paper's MoE++ presets by the name its tables use.
PRESETS = {
    "0.6B": "moepp-0.6b-8+4e.yaml",
    "1B": "moepp-1b-16+4e.yaml",
    "2B": "moepp-2b-32+8e.yaml",
    "7B": "moepp-7b-16+4e.yaml",
}
# The paper's tau sweep (its Table 4).
TAUS = (0.10, 0.25, 0.50, 0.75, 1.00)
