"""``torch.compile`` for the MoE++ pure functions (routing, ZC experts).

Eager, routing is a dozen small [T, N] kernels and the ZC experts a handful of [T, D]
passes; compiled, each becomes a few fused kernels, so next to the FFN experts they cost
little (``moepp-bench overhead`` measures their share). Switched on per layer by
``MoEPPTransformerConfig.moepp_compile`` (``model.moe.compile_routing``; default: on for GPU
runs, off on CPU, where compiling takes longer than a test runs).

``fullgraph=True`` makes a graph break an error: the compiled functions contain no
Python-visible tensor value, hence no host-device synchronisation.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled once per process (shapes specialise, then go dynamic on a change)."""
    return torch.compile(fn, fullgraph=True)
