"""``moepp-plot RUN_DIR``: PNGs of a run's curves from its metrics.jsonl, into RUN_DIR/plots/.

    moepp-plot runs/demo/run             # loss.png and routing.png in runs/demo/run/plots/
    moepp-plot RUN_DIR --out DIR

- loss.png: training lm loss, validation loss (and dropless validation loss when the run
  has ``training.eval_dropless``), and the load-balance loss (and z-loss) per layer;
- routing.png: per layer (rows) over iterations: FFN experts per token, ZC share of the
  top-k slots by type, FFN load max/mean, each as picked by the router (dashed) and as kept
  after capacity dropping (solid), and the dropped fraction.

Needs matplotlib: pip install 'moepp-megatron[plot]'. Works while the run is still writing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moepp_megatron.training.metrics import METRICS_FILE, read_metrics

STYLES = {"picked": "--", "kept": "-"}
AUX_TITLES = {"load_balancing_loss": "load-balance loss", "z_loss": "z-loss"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (writes files; needs no display)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'moepp-megatron[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_run(records: list[dict], out: Path) -> list[Path]:
    """loss.png and routing.png from a run's metrics records, written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if "lm_loss" in r]
    routed = [r for r in train if "routing" in r]  # skipped steps (non-finite loss) have none
    valid = [r for r in records if "valid" in r]
    return [plot_losses(train, routed, valid, out / "loss.png"), plot_routing(routed, out / "routing.png")]


def plot_losses(train: list[dict], routed: list[dict], valid: list[dict], path: Path) -> Path:
    plt = pyplot()
    aux = [name for name in AUX_TITLES if name in routed[-1]]
    fig, axes = plt.subplots(1, 1 + len(aux), figsize=(5.5 * (1 + len(aux)), 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["iteration"] for r in train], [r["lm_loss"] for r in train], label="train")
    for key, label in (("lm_loss", "validation"), ("lm_loss_dropless", "validation, dropless")):
        points = [(r["iteration"], r["valid"][key]) for r in valid if key in r["valid"]]
        if points:
            ax.plot(*zip(*points), marker="o", linestyle=":", label=label)
    ax.set(xlabel="iteration", ylabel="lm loss", title="lm loss")
    ax.legend(fontsize=8)
    for ax, name in zip(axes[0][1:], aux):
        for layer in routed[-1][name]:
            ax.plot([r["iteration"] for r in routed], [r[name][layer] for r in routed], label=layer)
        ax.set(xlabel="iteration", title=AUX_TITLES[name])
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_routing(routed: list[dict], path: Path) -> Path:
    """One row per layer; picked dashed, kept solid; ZC types and statistics by colour."""
    plt = pyplot()
    layers = list(routed[-1]["routing"])
    kinds = list(routed[-1]["routing"][layers[0]]["kept"]["zc_share"])
    columns = ["FFN experts / token", *(["ZC share of top-k slots"] if kinds else []), "FFN load max / mean",
               "dropped fraction"]
    fig, axes = plt.subplots(len(layers), len(columns), figsize=(4 * len(columns), 2.6 * len(layers)),
                             sharex=True, squeeze=False)
    iterations = [r["iteration"] for r in routed]
    for row, layer in zip(axes, layers):
        stats = [r["routing"][layer] for r in routed]
        panels = dict(zip(columns, row))
        for when, style in STYLES.items():
            sides = [s[when] for s in stats]
            panels["FFN experts / token"].plot(iterations, [s["ffn_experts_per_token"] for s in sides],
                                               style, color="C0", label=when)
            for k, kind in enumerate(kinds):
                panels["ZC share of top-k slots"].plot(iterations, [s["zc_share"][kind] for s in sides], style,
                                                       color=f"C{k + 1}", label=f"{kind}, {when}")
            # Records written before picked / kept were split have no picked load imbalance.
            if "ffn_load_imbalance" in sides[-1]:
                panels["FFN load max / mean"].plot(iterations, [s.get("ffn_load_imbalance") for s in sides],
                                                   style, color="C0", label=when)
        panels["dropped fraction"].plot(iterations, [s["dropped_fraction"] for s in stats], color="C3")
        for title, ax in panels.items():
            ax.set_title(f"{layer}: {title}", fontsize=9)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    return save(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moepp-plot", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a moepp-train run directory")
    parser.add_argument("--out", type=Path, help="where to write the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.run_dir)
    except FileNotFoundError as e:
        parser.error(str(e))
    if not any("routing" in r for r in records):
        parser.error(f"{args.run_dir / METRICS_FILE}: no training step logged yet")
    try:
        pyplot()
    except ImportError as e:
        parser.exit(1, f"moepp-plot: {e}\n")
    for path in plot_run(records, args.out or args.run_dir / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
