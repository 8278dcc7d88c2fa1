"""Bits/dim against training minutes for runs trained side by side (a plot and a table), from their run
directories: the CSV log's bits/dim and train.log's wall clock (each run's updates spread evenly over
its training time, so compare runs that shared one machine). The table also gives each run's mean
training bits/dim over its last 50 logged steps, and how far its training curve lies from the first
run's: the mean absolute difference at the steps both logged (two runs of one seed that should agree).

    python -m vdvae.compare_runs logs/train/runs/A logs/train/runs/B --labels VDVAE Efficient --out bpd.png
"""

import argparse
import csv
import re
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vdvae.errors import refuse  # noqa: E402

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")


def training_minutes(run: Path) -> float:
    """Wall-clock minutes from the run's first log line to the end of training (else its last line)."""
    stamped = [
        (datetime.fromisoformat(m.group(1)), line)
        for line in (run / "train.log").read_text().splitlines()
        if (m := STAMP.match(line))
    ]
    end = next((t for t, line in stamped if "Trainer.fit` stopped" in line), stamped[-1][0])
    return (end - stamped[0][0]).total_seconds() / 60


def curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of train/bpd and val/bpd from the run's CSV log; refused in one line where the run has
    none (a W&B-only run) or it holds no bits/dim yet."""
    found = sorted(run.glob("csv/version_*/metrics.csv"))
    if not found or not (run / "train.log").is_file():
        refuse(
            f"{run}: no CSV log and train.log (csv/version_*/metrics.csv): compare_runs reads run folders trained "
            f"with logger=csv or logger=many; compare W&B-only runs in W&B (vdvae-dashboard)"
        )
    metrics = found[-1]
    out = {"train/bpd": [], "val/bpd": []}
    for row in csv.DictReader(metrics.open()):
        for key in out:
            if row.get(key):
                out[key].append((int(row["step"]), float(row[key])))
    if not out["train/bpd"] and not out["val/bpd"]:
        refuse(f"{run}: its CSV log holds no bits/dim yet (training logs every trainer.log_every_n_steps steps)")
    return out


def mean_gap(a, b) -> float:
    """Mean |a - b| over the steps both (step, value) curves logged."""
    other = dict(b)
    gaps = [abs(value - other[step]) for step, value in a if step in other]
    return sum(gaps) / len(gaps) if gaps else float("nan")


def test_bpd(run: Path) -> float | None:
    found = re.findall(r"test: ([\d.]+) bits/dim", (run / "train.log").read_text())
    return float(found[-1]) if found else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("bpd_vs_minutes.png"))
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    print(f"{'run':<24} {'minutes':>8} {'steps':>6} {'val bpd':>8} {'test bpd':>8} {'last 50':>8} {'gap':>8}")
    first, top = None, 5.0  # the plot starts below the first steps' bits/dim, and shows where every run ends
    for run, label in zip(args.runs, labels, strict=True):
        data, minutes = curves(run), training_minutes(run)
        first = first or data["train/bpd"]
        last_step = max(step for step, _ in data["train/bpd"] + data["val/bpd"])
        per_step = minutes / max(last_step, 1)
        train = data["train/bpd"]  # none in a run shorter than its logging interval
        windows = [[v for _, v in train[max(0, i - 4) : i + 1]] for i in range(len(train))]  # 5 logged steps
        smooth = [sum(w) / len(w) for w in windows]
        top = max(top, 1.1 * smooth[-1]) if smooth else top
        (line,) = ax.plot([s * per_step for s, _ in train], smooth, alpha=0.6, label=f"{label}: train (online)")
        ax.plot(
            [s * per_step for s, _ in data["val/bpd"]],
            [v for _, v in data["val/bpd"]],
            "o-",
            color=line.get_color(),
            label=f"{label}: val (EMA)",
        )
        val = data["val/bpd"][-1][1] if data["val/bpd"] else float("nan")
        last_50 = [v for _, v in train[-50:]]
        print(
            f"{label:<24} {minutes:8.1f} {last_step:6d} {val:8.4f} {test_bpd(run) or float('nan'):8.4f} "
            f"{sum(last_50) / len(last_50) if last_50 else float('nan'):8.4f} {mean_gap(train, first):8.4f}"
        )
    ax.set(xlabel="training minutes (side by side on one machine)", ylabel="bits per dim", ylim=(None, top))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
