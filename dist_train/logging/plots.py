"""Loss curves as a PNG, drawn from ``metrics.jsonl`` (no pyplot state, no display needed)."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional


def _read_series(metrics_path: str, keys) -> Dict[str, Dict[int, float]]:
    """``{key: {step: value}}``; a step logged twice (a resumed run redoing steps) keeps the last."""
    series: Dict[str, Dict[int, float]] = {key: {} for key in keys}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            for key in keys:
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    series[key][int(record["step"])] = float(value)
    return series


def loss_curves(metrics_path: str, out_path: str) -> Optional[str]:
    """Write train and eval loss against the optimizer step to ``out_path``; None when there is no loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not os.path.exists(metrics_path):
        return None
    series = _read_series(metrics_path, ("loss", "eval_loss"))
    if not series["loss"] and not series["eval_loss"]:
        return None
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        points = sorted(series[key].items())
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    return out_path
