"""Plot the demo model's training curve and head scores from the JSON log of :mod:`attnlens.demo.train`.

Usage::

    python -m attnlens.demo.plot_training docs/img/demo-training.json docs/img/demo-training.png

Needs matplotlib (the ``viz`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def phase_change_step(records: list[dict[str, Any]], threshold: float = 0.5) -> int | None:
    """First recorded step at which some head's induction score reaches ``threshold``.

    Args:
        records: The ``records`` of a training log.
        threshold: Induction score that counts as formed.

    Returns:
        The step, or ``None`` if no record reaches the threshold.
    """
    for record in records:
        if max(max(row) for row in record["induction"]) >= threshold:
            return int(record["step"])
    return None


def plot(log: dict[str, Any], out: Path) -> None:
    """Draw loss (all tokens and the repeated half) and the best head scores against the step; save as PNG.

    Args:
        log: A training log written by ``python -m attnlens.demo.train --log``.
        out: Output image path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = log["records"]
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    ax_loss.plot(steps, [r["loss"] for r in records], label="all tokens")
    ax_loss.plot(steps, [r["loss_repeated"] for r in records], label="repeated half of random rows")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="language-model loss")
    ax_loss.set_ylim(bottom=0)
    ax_loss.legend()
    for key, label in (("induction", "induction"), ("previous_token", "previous-token")):
        n_head = len(records[0][key][0])
        final = records[-1][key]
        layer, head = max(
            ((li, hi) for li in range(len(final)) for hi in range(n_head)), key=lambda lh: final[lh[0]][lh[1]]
        )
        ax_score.plot(steps, [r[key][layer][head] for r in records], label=f"{label} score of L{layer}H{head}")
    ax_score.plot(
        steps,
        [max(max(row) for row in r["induction"]) for r in records],
        color="grey",
        linestyle=":",
        label="best induction score, any head",
    )
    ax_score.set(xlabel="step", ylabel="score", title="head scores", ylim=(0, 1.02))
    ax_score.legend(loc="center right")
    change = phase_change_step(records)
    if change is not None:
        for ax in (ax_loss, ax_score):
            ax.axvline(change, color="black", linewidth=0.8, linestyle="--")
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Entry point: read the log, write the figure, print the phase-change step.

    Args:
        argv: Command line arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="JSON log written by python -m attnlens.demo.train --log")
    parser.add_argument("out", type=Path, help="output PNG")
    args = parser.parse_args(argv)
    log = json.loads(args.log.read_text())
    plot(log, args.out)
    print(f"phase change (first induction score >= 0.5) at step {phase_change_step(log['records'])}")


if __name__ == "__main__":
    main()
