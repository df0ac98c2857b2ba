"""Training curves of the converged protocol: per-epoch train loss and validation accuracy of every
cached run (each learning rate tried at the selection seed, the other seeds, the multitask model).

    python benchmarks/minilm/curves.py [--seeds 0 1 2]     # from the repo root; reads the model cache

Writes benchmarks/results/finetune_curves.md + .png + .json. Only cached runs are read: nothing trains.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
from common import Protocol, _key, train_log  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _cached(name: str, tasks, config, protocol: Protocol) -> dict | None:
    path = common.CACHE / "models" / f"{name}-{_key(tasks, config, protocol.train_limit, protocol.val_limit, True)}"
    return train_log(path) if (path / "train_log.json").is_file() else None


def collect(protocol: Protocol, suite, seeds) -> list[dict]:
    """One entry per cached run: task, seed, lr, whether it is the model the tables use, its curve."""
    runs = []
    for name, task in suite.items():
        scores = {}
        for lr in protocol.lrs:
            record = _cached(name, [task], protocol.config(lr, protocol.select_seed), protocol)
            if record is not None:
                scores[lr] = record["best_validation"]
        chosen = max(scores, key=lambda lr: (scores[lr], -lr)) if scores else None
        for lr in protocol.lrs:
            for seed in seeds:
                if seed != protocol.select_seed and lr != chosen:
                    continue
                record = _cached(name, [task], protocol.config(lr, seed), protocol)
                if record is not None:
                    runs.append(_entry(name, seed, lr, lr == chosen, record))
    for seed in seeds:
        config = replace(protocol.config(protocol.multitask_lr, seed), epochs=protocol.multitask_epochs)
        record = _cached("multitask", list(suite.values()), config, protocol)
        if record is not None:
            runs.append(_entry("multitask", seed, protocol.multitask_lr, True, record))
    return runs


def _entry(name: str, seed: int, lr: float, used: bool, record: dict) -> dict:
    return {"task": name, "seed": seed, "lr": lr, "used": used, "best_epoch": record["best_epoch"],
            "best_validation": record["best_validation"], "seconds": record["seconds"], "steps": record["steps"],
            "curve": record["curve"], "torch_threads": record.get("torch_threads")}


def write(out: Path, protocol: Protocol, suite, heads, seeds, device: str = "cpu") -> list[dict]:
    runs = collect(protocol, suite, seeds)
    payload = {"protocol": protocol.__dict__, "max_length": common.MAX_LENGTH, "runs": runs}
    (out / "finetune_curves.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = ["# Fine-tuning curves (converged protocol)\n",
             f"Every cached run of the protocol in `common.Protocol`: learning rates {list(protocol.lrs)} tried as a "
             f"ladder at seed {protocol.select_seed} (the next rate only while the best run was still improving at "
             f"its last epoch), at most {protocol.max_epochs} epochs with early stopping (patience "
             f"{protocol.patience}; the best-validation epoch is kept), multitask lr {protocol.multitask_lr} for at "
             f"most {protocol.multitask_epochs} epoch(s); max length {common.MAX_LENGTH} tokens. Per epoch: mean "
             "train loss / validation accuracy (%) on the task's validation split (multitask: mean over tasks). "
             "used = the model the tables merge.\n",
             "| task | seed | lr | used | " + " | ".join(f"epoch {i}" for i in range(1, _max_epochs(runs) + 1))
             + " | best epoch | seconds |",
             "|---|---|---|---|" + "---|" * _max_epochs(runs) + "---|---|"]
    for r in runs:
        cells = [f"{e['train_loss']:.3f} / {100 * e['validation']:.1f}" if e["validation"] is not None
                 else f"{e['train_loss']:.3f}" for e in r["curve"]]
        cells += ["–"] * (_max_epochs(runs) - len(cells))
        lines.append(f"| {r['task']} | {r['seed']} | {r['lr']:g} | {'yes' if r['used'] else ''} | "
                     + " | ".join(cells) + f" | {r['best_epoch']} | {r['seconds']:.0f} |")
    converged = [r for r in runs if r["used"] and r["task"] != "multitask"]
    at_end = [f"{r['task']} (seed {r['seed']})" for r in converged if r["best_epoch"] == len(r["curve"])
              and len(r["curve"]) == protocol.max_epochs]
    lines.append("")
    lines.append(f"{len(converged)} task runs used by the tables; " + (
        f"{len(at_end)} still improved at their last allowed epoch: {', '.join(at_end)}." if at_end
        else "every one peaked before its last allowed epoch or stopped early (validation plateaued)."))
    (out / "finetune_curves.md").write_text("\n".join(lines) + "\n\n![curves](finetune_curves.png)\n")
    _plot(out / "finetune_curves.png", runs)
    return runs


def _max_epochs(runs) -> int:
    return max((len(r["curve"]) for r in runs), default=1)


def _plot(path: Path, runs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["task"] for r in runs}, key=lambda n: (n == "multitask", n))
    if not names:
        return
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for r in (r for r in runs if r["task"] == name):
            epochs = [e["epoch"] for e in r["curve"]]
            val = [100 * e["validation"] for e in r["curve"] if e["validation"] is not None]
            style = "-" if r["used"] else ":"
            ax.plot(epochs[:len(val)], val, style, marker="o", label=f"lr {r['lr']:g} s{r['seed']}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val. acc. (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    from finetune_all import protocol_args, protocol_from

    from tiesmerge_bench import load_suite

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    protocol_args(parser)
    args = parser.parse_args()
    write(args.out, protocol_from(args), load_suite(None), None, args.seeds)


if __name__ == "__main__":
    main()
