"""report.png: evaluate's report as a picture, what a person looks at before the numbers.

Held-out accuracies of every model scored side by side (the champion too, when evaluate scored
it: publish decides on that comparison, so the picture shows it) with the gains and their
intervals in the title, and the latency of student and teacher (the two models timed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def chart(report: dict, path: Path) -> None:
    """report.png: the figure below, saved."""
    fig = figure(report)  # first: it selects the Agg backend (no display) before pyplot loads
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(report: dict):
    """The report as a picture: held-out accuracies of every model scored (the current champion too,
    when evaluate scored it: publish decides on that comparison, so the picture shows it) and the
    latency of student and teacher (the only two timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    names = ["mlm_accuracy", "mlm_accuracy_outside_top10", "agreement_with_teacher"]
    x = np.arange(len(names))
    whos = [w for w in ("baseline", "control", "champion", "student", "teacher") if w in report]
    width = 0.8 / len(whos)
    labels = {"control": "control (no teacher)"}
    if "champion" in report:
        version = report["champion"].get("version")
        labels["champion"] = f"champion (version {version})" if version is not None else "champion"
    for i, who in enumerate(whos):
        left.bar(x + (i - (len(whos) - 1) / 2) * width, [report[who].get(n, 0) for n in names], width,
                 label=labels.get(who, who))
    left.set_xticks(x, ["top-1", "top-1 outside\n10 most frequent", "agreement\nwith teacher"])
    left.set_ylabel("held-out masked positions")
    left.legend()
    title = f"{report['positions']:,} held-out masked positions"
    for key, against in (("distillation_gain", "control"), ("gain_over_champion", "champion")):
        if key in report:
            g = report[key]
            title += (f"\ngain over {against} {g['mlm_accuracy'] * 100:+.1f} points "
                      f"(95% CI {g['ci95_low'] * 100:+.1f} to {g['ci95_high'] * 100:+.1f})")
    left.set_title(title)
    whos = ["student", "teacher"]
    right.bar(np.arange(2) - 0.2, [report[w]["latency_encoder_s"] for w in whos], 0.4, label="encoder")
    right.bar(np.arange(2) + 0.2, [report[w]["latency_mlm_s"] for w in whos], 0.4, label="encoder + MLM head")
    right.set_xticks(np.arange(2), [f"{w}\n{report[w]['layers']} layers, {report[w]['parameters'] / 1e6:.1f} M"
                                    for w in whos])
    right.set_ylabel("seconds per batch")
    right.legend()
    right.set_title(f"encoder {report['speedup_encoder']:.2f}x faster")
    fig.tight_layout()
    return fig
