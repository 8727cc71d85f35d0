"""What a run shows and records: a progress bar, a JSONL log, TensorBoard, and a loss-curve plot.

The bar (tqdm, on the first process) shows loss, learning rate and tokens/s, with tqdm's ETA.
``train_log.jsonl`` gets one line per logging step (``step``, ``loss``, ``learning_rate``,
``grad_norm``, ``tokens``, ``tokens_per_second``, ``epoch``, ``seconds``); on ``--resume`` lines past
the checkpoint's step are dropped first, so the file is the one curve of the run. TensorBoard gets
the same numbers through transformers' own ``TensorBoardCallback`` (``report_to``). ``loss.svg`` is
drawn from the JSONL log at the end, with no plotting library.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

LOG = "train_log.jsonl"
PLOT = "loss.svg"


class ProgressBar(TrainerCallback):
    """One tqdm bar over the optimizer steps: ``loss``, ``lr``, ``tok/s`` and the ETA."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            file=sys.stderr, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix({"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}",
                                  "tok/s": f"{logs.get('tokens_per_second', 0):.0f}"})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlLog(TrainerCallback):
    """Appends each training log to ``train_log.jsonl`` (first process only)."""

    def __init__(self, path: Path):
        self.path = path
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            truncate(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                 "seconds": round(time.perf_counter() - self.started, 3)}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run re-logs what came after its checkpoint)."""
    kept = [e for e in read_log(path) if e["step"] <= step]
    path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")


def plot(log: Path, out: Path, *, title: str = "training loss") -> Path | None:
    """Draw the loss curve of ``log`` as an SVG line chart; None when nothing was logged."""
    points = [(e["step"], e["loss"]) for e in read_log(log) if "loss" in e]
    if not points:
        return None
    width, height, pad = 640, 360, 48
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses), max(max(losses), min(losses) + 1e-6)

    def xy(step: float, loss: float) -> str:
        x = pad + (step - x0) / (x1 - x0) * (width - 2 * pad)
        y = height - pad - (loss - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(s, v) for s, v in points)
    svg = f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>
<text x="{pad}" y="{height - pad + 16}" text-anchor="middle">{x0}</text>
<text x="{width - pad}" y="{height - pad + 16}" text-anchor="middle">{x1}</text>
<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step</text>
<text x="{pad - 6}" y="{height - pad}" text-anchor="end">{y0:.3g}</text>
<text x="{pad - 6}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>
</svg>
"""
    out.write_text(svg, encoding="utf-8")
    return out
