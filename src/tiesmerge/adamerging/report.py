"""What a learned merge looks like: the coefficients (JSON + a task x layer heat map) and the
entropy curve (JSON + PNG), written beside the merged model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..lazy import torch
from ..paths import write_file
from ..plotting import plain, pyplot
from .learn import History

__all__ = ["COEFFICIENTS_JSON", "COEFFICIENTS_PNG", "ENTROPY_JSON", "ENTROPY_PNG", "coefficients_record",
           "summarise", "write_report"]

COEFFICIENTS_JSON = "adamerging_coefficients.json"
COEFFICIENTS_PNG = "adamerging_coefficients.png"
ENTROPY_JSON = "adamerging_entropy.json"
ENTROPY_PNG = "adamerging_entropy.png"


def coefficients_record(coefficients: torch.Tensor, tasks: Sequence[str], layers: Sequence[str],
                        granularity: str) -> dict[str, Any]:
    """(T, L) -> {"tasks", "layers", "granularity", "values": T rows of L}. Task-wise, the one
    layer is named "*" (every merged tensor)."""
    names = list(layers) if granularity == "layer" else ["*"]
    return {"granularity": granularity, "tasks": list(tasks), "layers": names,
            "values": [[round(float(x), 6) for x in row] for row in coefficients.tolist()]}


def summarise(coefficients: torch.Tensor, tasks: Sequence[str], layers: Sequence[str], granularity: str,
              top: int = 5) -> dict[str, Any]:
    """Which tasks and layers got large coefficients: per task the mean (and range), and the
    layers with the largest mean over tasks."""
    c = coefficients.float()  # (T, L)
    out: dict[str, Any] = {"per_task": {t: {"mean": round(float(c[i].mean()), 4), "min": round(float(c[i].min()), 4),
                                            "max": round(float(c[i].max()), 4)} for i, t in enumerate(tasks)},
                           "mean": round(float(c.mean()), 4)}
    if granularity == "layer" and c.shape[1] > 1:
        by_layer = c.mean(0)  # (L,)
        order = by_layer.argsort(descending=True).tolist()
        out["largest_layers"] = [(layers[i], round(float(by_layer[i]), 4)) for i in order[:top]]
        out["smallest_layers"] = [(layers[i], round(float(by_layer[i]), 4)) for i in order[::-1][:top]]
    return out


def _plt():
    return pyplot("the coefficients' heat map", required=False)


def write_report(directory: Path, coefficients: torch.Tensor, tasks: Sequence[str], layers: Sequence[str],
                 granularity: str, history: History) -> list[str]:
    """Write the JSON files (always) and the PNGs (when matplotlib is installed); return the names written."""
    written = [COEFFICIENTS_JSON, ENTROPY_JSON]
    record = coefficients_record(coefficients, tasks, layers, granularity)
    record["summary"] = summarise(coefficients, tasks, layers, granularity)
    write_file(directory / COEFFICIENTS_JSON, json.dumps(record, indent=1) + "\n")
    curve = {"tasks": list(history.tasks), "steps": len(history.entropy), "mean": history.mean(),
             "per_task": history.entropy}
    write_file(directory / ENTROPY_JSON, json.dumps(curve) + "\n")
    plt = _plt()
    if plt is None:
        return written
    c = coefficients.float().numpy()
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.08 * c.shape[1]), 1.2 + 0.35 * len(tasks)))
    im = ax.imshow(c, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(tasks)), [plain(task) for task in tasks])
    ax.set_xlabel("parameter tensor (checkpoint order)" if granularity == "layer" else "all tensors")
    ax.set_title(f"AdaMerging coefficients ({granularity}-wise)")
    fig.colorbar(im, ax=ax, label="coefficient")
    fig.tight_layout()
    fig.savefig(directory / COEFFICIENTS_PNG, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = range(1, len(history.entropy) + 1)
    for i, task in enumerate(history.tasks):
        ax.plot(steps, [row[i] for row in history.entropy], lw=0.8, alpha=0.6, label=plain(task))
    ax.plot(steps, history.mean(), color="black", lw=1.6, label="mean")
    ax.set_xlabel("step")
    ax.set_ylabel("entropy (nats)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(directory / ENTROPY_PNG, dpi=110)
    plt.close(fig)
    return written + [COEFFICIENTS_PNG, ENTROPY_PNG]
