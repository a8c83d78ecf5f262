"""``moepp-convert``: megatron dist checkpoints <-> Hugging Face MoE++ models.

    moepp-convert to-hf --checkpoint RUN_OR_CHECKPOINTS_OR_ITER_DIR [--iteration N] \\
        --output HF_DIR [--dtype bf16|fp16|fp32] [--tokenizer SPM_MODEL]
    moepp-convert from-hf --hf HF_DIR --output CKPT_DIR [--tp N] [--pp N] [--ep N] [--vpp N] \\
        [model.moe.capacity_factor=null ...]

Runs in one process on CPU, whatever the checkpoint's parallel layout (the GPUs are hidden).
Load a converted model with ``AutoModelForCausalLM.from_pretrained(HF_DIR,
trust_remote_code=True)``; continue pretraining from CKPT_DIR with ``moepp-train --config
CKPT_DIR/run.yaml --config RECIPE ... checkpoint.init_from=CKPT_DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys

from moepp_megatron.known_warnings import ignore_known_warnings


def _parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moepp-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="megatron dist checkpoint -> Hugging Face directory")
    to_hf.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, or an iter_NNNNNNN/ dir")
    to_hf.add_argument("--iteration", type=int, default=None, help="default: the latest checkpoint")
    to_hf.add_argument("--output", required=True, help="HF model directory to create")
    to_hf.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    to_hf.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the run's data.tokenizer_model)")
    to_hf.add_argument("--max-shard-size", type=_parse_size, default="5GB", help="e.g. 5GB, 500MB")

    from_hf = commands.add_parser("from-hf", help="Hugging Face directory -> megatron dist checkpoint (iteration 0)")
    from_hf.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    from_hf.add_argument("--output", required=True, help="checkpoint directory to create")
    from_hf.add_argument("--tp", type=int, default=1, help="parallel.tensor of the saved run config")
    from_hf.add_argument("--pp", type=int, default=1, help="parallel.pipeline")
    from_hf.add_argument("--ep", type=int, default=1, help="parallel.expert")
    from_hf.add_argument("--vpp", type=int, default=None, help="parallel.virtual_pipeline")
    from_hf.add_argument("--vocab-size-divisible-by", type=int, default=128)
    from_hf.add_argument("overrides", nargs="*", help="model.dotted.key=value for fields HF does not carry")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    ignore_known_warnings()
    # Conversion is CPU work in one process; megatron's CPU mode refuses to run beside CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.command == "to-hf":
        from moepp_megatron.conversion.to_hf import export_to_hf

        report = export_to_hf(
            args.checkpoint, args.output, iteration=args.iteration, dtype=args.dtype,
            tokenizer=args.tokenizer, max_shard_bytes=args.max_shard_size,
        )
        layout = (
            'model_type "MoE++" (the released format)' if report.release_format
            else 'model_type "moepp-megatron" (moepp_* fields the released MoE++ code does not compute)'
        )
        print(
            f"wrote {report.output}: iteration {report.iteration}, {report.num_tensors} tensors, "
            f"{report.num_parameters:,} parameters in {len(report.shards)} shard(s), {layout}, "
            f"tokenizer {'from ' + str(report.tokenizer) if report.tokenizer else 'not written'} "
            f"({report.seconds:.1f} s)"
        )
        return 0
    from moepp_megatron.conversion.from_hf import RUN_CONFIG, import_from_hf

    report = import_from_hf(
        args.hf, args.output, tensor=args.tp, pipeline=args.pp, expert=args.ep,
        virtual_pipeline=args.vpp, vocab_size_divisible_by=args.vocab_size_divisible_by,
        overrides=args.overrides,
    )
    p = report.parallel
    print(
        f"wrote {report.output} (iteration 0; layout TP={p.tensor} PP={p.pipeline} EP={p.expert}"
        f"{'' if not report.padded_vocab_rows else f'; {report.padded_vocab_rows} zero vocab rows added'}) "
        f"in {report.seconds:.1f} s. Continue pretraining with: moepp-train --config "
        f"{report.output / RUN_CONFIG} --config RECIPE ... checkpoint.init_from={report.output}"
    )
    if report.tokenizer is None:
        print("note: the HF directory has no tokenizer.model; set data.tokenizer_model yourself")
    return 0


if __name__ == "__main__":
    sys.exit(main())
