"""Zero-computation experts never enter the dispatcher: with EP=2 and the alltoall
dispatcher, the token rows that actually go through all_to_all equal the number of FFN
assignments, and tokens whose picks are all ZC experts send nothing."""

from __future__ import annotations

import torch

from moepp_megatron.config.schema import ParallelConfig
from tests.distributed import run_distributed
from tests.parallel import workers
from tests.tiny_models import tiny_model


def _count_traffic_rank(model):
    from megatron.core.transformer.moe import token_dispatcher

    from moepp_megatron.moepp.router import MoEPPRouter

    (gpt,) = workers.setup(model, ParallelConfig(cpu_mode=True, expert=2), seed=3)
    gpt.eval()
    rows_exchanged, ffn_assignments, zc_only_tokens, tokens = [], [], [], []
    real_all_to_all = token_dispatcher.all_to_all

    def counting_all_to_all(group, input_, output_split_sizes=None, input_split_sizes=None):
        rows_exchanged.append(input_.shape[0])
        return real_all_to_all(group, input_, output_split_sizes, input_split_sizes)

    def record_routing(module, args, output):
        _, routing_map, _ = output
        ffn_map = routing_map[:, : module.config.num_moe_experts]
        ffn_assignments.append(int(ffn_map.sum()))
        zc_only_tokens.append(int((~ffn_map.any(dim=1)).sum()))
        tokens.append(routing_map.shape[0])

    token_dispatcher.all_to_all = counting_all_to_all
    for module in gpt.modules():
        if isinstance(module, MoEPPRouter):
            module.register_forward_hook(record_routing)
    rank = torch.distributed.get_rank()
    batch = workers.microbatches(model.vocab_size, 1, 4, model.seq_length, seed=11 + rank)[0]
    with torch.no_grad():
        gpt(batch["tokens"], batch["position_ids"], None)
    return dict(rows=rows_exchanged, ffn=ffn_assignments, zc_only=zc_only_tokens, tokens=tokens)


def test_zc_only_tokens_cause_no_dispatcher_traffic():
    model = tiny_model(routing="paper", token_dispatcher="alltoall")
    ranks = run_distributed(_count_traffic_rank, 2, model)
    # Per layer three all_to_alls: dispatch sends this rank's FFN assignments (hidden
    # states, then their gates); combine sends back the rows this rank's experts received,
    # so summed over ranks it equals all FFN assignments too.
    combined = [sum(r["rows"][2::3][layer] for r in ranks) for layer in range(2)]
    assert combined == [sum(r["ffn"][layer] for r in ranks) for layer in range(2)]
    for rank, counts in enumerate(ranks):
        num_layers = len(counts["ffn"])
        assert counts["rows"][0::3] == counts["rows"][1::3] == counts["ffn"], counts
        assert sum(counts["zc_only"]) > 0, "the test needs tokens that picked only ZC experts"
        topk = model.moe.topk
        assert sum(counts["ffn"]) < topk * sum(counts["tokens"]), "ZC picks must not be sent"
        print(f"rank {rank}: {num_layers} layers, rows sent {counts['rows'][::3]}, "
              f"tokens x k = {[t * topk for t in counts['tokens']]}, ZC-only tokens {counts['zc_only']}")
