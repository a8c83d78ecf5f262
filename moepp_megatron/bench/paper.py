"""The paper's expert forward times (docs/MOEPP_SPEC.md section 4), for comparison only."""

from __future__ import annotations

from typing import Optional

# ms; "moe" is vanilla MoE, the float keys are MoE++ at that tau.
EXPERT_FORWARD_MS = {
    "0.6B": {"moe": 535.3, 0.10: 202.4, 0.25: 277.8, 0.50: 387.3, 0.75: 427.6, 1.00: 449.6},
    "1B": {"moe": 610.9, 0.10: 289.3, 0.25: 384.9, 0.50: 469.7, 0.75: 500.3, 1.00: 530.2},
    "2B": {"moe": 683.4, 0.10: 417.9, 0.25: 473.7, 0.50: 532.7, 0.75: 561.0, 1.00: 590.5},
    "7B": {"moe": 1859.0, 0.75: 1455.0},
}


def paper_speedup(model: str, tau: Optional[float]) -> Optional[float]:
    """t_MoE / t_MoE++ from the paper's table, or None where it has no number."""
    times = EXPERT_FORWARD_MS.get(model, {})
    if tau is None or round(tau, 2) not in times:
        return None
    return times["moe"] / times[round(tau, 2)]
