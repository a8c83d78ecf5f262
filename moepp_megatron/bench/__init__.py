"""``moepp-bench``: MoE++ against vanilla MoE and against the ideal speed-up bound.

Benchmarks (one module each, one sub-command each, every run writes one JSON record under
``bench/results/``; ``moepp-bench report`` rebuilds the README's Performance tables):

- ``layer`` (layer.py): one MoE++ layer vs one vanilla MoE layer at the paper's layer
  shapes, forward and forward+backward, under the freshly initialised router and under the
  balanced distribution the heterogeneous loss drives towards at each tau.
- ``overhead`` (overhead.py): the share of an MoE++ layer's time spent in routing and the ZC
  experts, eager and ``torch.compile``-d.
- ``comm`` (comm.py): bytes the alltoall dispatcher moves per step at EP = 2 and 4.
- ``train`` (train.py): tokens/s, peak memory and MFU of full training steps.

The pieces they share: forced routing distributions (distributions.py), timing and the
environment of a record (measure.py, records.py), process launching (launch.py), the
README tables and the paper's numbers (report.py).
"""
