"""Fine-tune (or reuse) the converged per-task encoders and the multitask encoder. From the repo root:

    python benchmarks/minilm/finetune_all.py [--tasks foods spam ...] [--seeds 0 1 2] [--device cuda]

Each task's learning rate is chosen on validation at seed 0 among --lrs (both runs are kept in the
cache), every run keeps its best-validation epoch (early stopping), and seeds 1, 2 reuse the chosen
rate. Models are cached under ~/.cache/tiesmerge/bench/models, so two processes on disjoint --tasks
(or one with --multitask-only) can share the work; `run.py` then finds every model in the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import Protocol, first_rung, make_heads, multitask_model, task_model  # noqa: E402

from tiesmerge_bench import TASK_NAMES, load_suite  # noqa: E402


def protocol_args(parser: argparse.ArgumentParser) -> None:
    """The protocol's flags, shared with run.py so both name the same cached models."""
    d = Protocol()
    parser.add_argument("--lrs", nargs="+", type=float, default=list(d.lrs),
                        help="learning rates tried per task at seed 0 (the best on validation is reused)")
    parser.add_argument("--max-epochs", type=int, default=d.max_epochs)
    parser.add_argument("--patience", type=int, default=d.patience, help="epochs without a new best before stopping")
    parser.add_argument("--multitask-lr", type=float, default=d.multitask_lr)
    parser.add_argument("--multitask-epochs", type=int, default=d.multitask_epochs)
    parser.add_argument("--train-limit", type=int, default=None, help="train examples per task (default all: 2000)")
    parser.add_argument("--es-val-limit", type=int, default=None,
                        help="validation examples per task for early stopping and the lr choice (default all: 500)")


def protocol_from(args) -> Protocol:
    return Protocol(lrs=tuple(args.lrs), max_epochs=args.max_epochs, patience=args.patience,
                    multitask_lr=args.multitask_lr, multitask_epochs=args.multitask_epochs,
                    train_limit=args.train_limit, val_limit=args.es_val_limit)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-multitask", action="store_true")
    parser.add_argument("--multitask-only", action="store_true")
    protocol_args(parser)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    protocol = protocol_from(args)
    suite = load_suite(None)  # the heads and the multitask model always see all eight tasks
    heads = make_heads(suite, args.device)
    if not args.multitask_only:
        if protocol.select_seed in args.seeds:
            # first every task at the ladder's first rate, so that one complete set of models exists
            # (on a slow machine) before any task climbs the ladder
            for name in args.tasks:
                t0 = time.perf_counter()
                path = first_rung(suite[name], heads, protocol, args.device, log)
                log(f"{name} seed {protocol.select_seed} lr {protocol.lrs[0]:g}: {path} "
                    f"({time.perf_counter() - t0:.0f} s)")
    # seed by seed, its multitask model right after its task models: a seed's table rows (run.py --cached-only)
    # can start while the next seed trains
    for seed in args.seeds:
        if not args.multitask_only:
            for name in args.tasks:
                t0 = time.perf_counter()
                path = task_model(suite[name], heads, protocol, seed, args.device, log)
                log(f"{name} seed {seed}: {path} ({time.perf_counter() - t0:.0f} s)")
        if not args.no_multitask:
            t0 = time.perf_counter()
            path = multitask_model(list(suite.values()), heads, protocol, seed, args.device, log)
            log(f"multitask seed {seed}: {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
