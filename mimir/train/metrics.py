"""Training metrics: one CSV row per logged step, the same values in TensorBoard, and a loss-curve PNG.

On resume the rows after the checkpoint's step are dropped (the killed run logged steps it will redo).
Only the main process writes.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

COLUMNS = ("step", "loss", "lr", "fuser_lr", "grad_norm", "seconds")


def read_metrics(path) -> list[dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


class Metrics:
    def __init__(self, run_dir, start_step: int, enabled: bool = True, tensorboard: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.csv_path = self.run_dir / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        kept = [row for row in read_metrics(self.csv_path) if row["step"] <= start_step]
        with self.csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: _fmt(row.get(k)) for k in COLUMNS} for row in kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow({k: _fmt(values.get(k, step if k == "step" else None))
                                                            for k in COLUMNS})
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"train/{key}", value, step)

    def plot(self) -> Path | None:
        """loss.png: the loss per step and its running mean, log scale."""
        rows = read_metrics(self.csv_path) if self.enabled else []
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in rows if math.isfinite(r["loss"])]  # steps skipped as non-finite (nonfinite=skip)
        if not rows:
            return None
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        smooth, running = [], losses[0]
        for loss in losses:
            running = 0.9 * running + 0.1 * loss
            smooth.append(running)
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, losses, alpha=0.35, label="loss")
        ax.plot(steps, smooth, label="running mean (0.9)")
        ax.set(xlabel="step", ylabel="v-prediction MSE", yscale="log", title="Mimir training loss")
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.8g}"
