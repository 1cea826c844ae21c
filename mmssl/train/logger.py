"""metrics.jsonl + TensorBoard + plots of the loss and of the schedule; rank 0 only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: Path) -> Path | None:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "step" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    ax[0].set_title("training loss")
    ax[1].plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("learning rate")
    ax[1].set_title("schedule")
    fig.tight_layout()
    out = run_dir / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


PHASE_COLOURS = {"warm-up": "tab:red", "cool-down": "tab:orange", "constant": "tab:green", "anneal": "tab:purple",
                 "cosine decay": "tab:blue"}


def plot_schedule(run_dir: Path, lrs: list[float], phases: list[tuple[str, int, int]], title: str = "schedule") -> Path:
    """``run_dir/plots/schedule.png``: the learning rate at every step of the whole run (``lrs``, computed
    from the schedule function, not sampled from the log), its phases shaded; and, for a run on several
    data sources, the fraction of batches each source gave per log interval (``source_frac/<name>`` in
    metrics.jsonl) against its target weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r and any(k.startswith("source_frac/") for k in r)]
    mix = next((r["sources"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "data"), None)
    fig, axes = plt.subplots(1, 2 if rows else 1, figsize=(10 if rows else 6, 3.4), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(len(lrs)), lrs, color="black", lw=1.2)
    for name, a, b in phases:
        ax.axvspan(a, b, color=PHASE_COLOURS.get(name, "tab:gray"), alpha=0.15, lw=0, label=f"{name} ({a}-{b})")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=9)
    if phases:
        ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(bottom=0)
    if rows:
        ax2 = axes[0][1]
        names = sorted({k for r in rows for k in r if k.startswith("source_frac/")})
        tot = sum(s["weight"] for s in mix) if mix else None
        steps = [r["step"] for r in rows]
        spans = [b - a for a, b in zip([0, *steps[:-1]], steps)]  # steps per log interval
        for k in names:
            label = k.split("/", 1)[1]
            frac = [r.get(k, 0.0) for r in rows]
            cum, n, done = [], 0.0, 0
            for f, w in zip(frac, spans):
                n, done = n + f * w, done + w
                cum.append(n / max(done, 1))
            line, = ax2.plot(steps, cum, lw=1.6, label=f"{label} (so far)")
            ax2.plot(steps, frac, lw=0.6, alpha=0.5, color=line.get_color())
            w = next((s["weight"] for s in mix or [] if s["label"] == label), None)
            if w is not None and tot:
                ax2.axhline(w / tot, color=line.get_color(), ls="--", lw=0.8)
        ax2.set_ylim(-0.03, 1.03)
        ax2.set_xlabel("step")
        ax2.set_ylabel("fraction of batches")
        ax2.set_title("data sources: since step 0 (thick), per log interval (thin), weights (dashed)", fontsize=8)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "plots" / "schedule.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
