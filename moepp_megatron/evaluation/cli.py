"""``moepp-eval``: lm-evaluation-harness on a converted Hugging Face MoE++ model.

    moepp-eval --model HF_DIR --output OUT_DIR                      # the paper's table
    moepp-eval --model HF_DIR --output OUT_DIR --tasks piqa hellaswag:10
    moepp-eval --model HF_DIR --output OUT_DIR --include-path MY_TASKS --tasks my_task:0

The paper preset (docs/MOEPP_SPEC.md section 4): 0-shot ARC-E, LAMBADA (openai), LogiQA, PIQA,
SciQ, WinoGrande; 10-shot HellaSwag; 25-shot ARC-C; 5-shot MMLU; 32-shot NQ (nq_open) and
BoolQ. Writes OUT_DIR/results.md and OUT_DIR/results.json.
"""

from __future__ import annotations

import argparse
import sys

from moepp_megatron.known_warnings import ignore_known_warnings


def main(argv=None) -> int:
    ignore_known_warnings()
    from moepp_megatron.evaluation.harness import PRESETS, evaluate, markdown_table, parse_tasks, write_results

    parser = argparse.ArgumentParser(
        prog="moepp-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="converted HF model directory (moepp-convert to-hf)")
    parser.add_argument("--output", required=True, help="directory for results.md and results.json")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="task table (when no --tasks)")
    parser.add_argument("--tasks", nargs="+", default=None, help="NAME[:SHOTS] ... instead of the preset")
    parser.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAMLs")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda:0")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32, ...")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (testing only)")
    args = parser.parse_args(argv)

    tasks = parse_tasks(args.tasks) if args.tasks else PRESETS[args.preset]
    rows = evaluate(
        args.model, tasks, include_path=args.include_path, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, limit=args.limit,
    )
    md, js = write_results(rows, args.output, args.model)
    print(markdown_table(rows))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
