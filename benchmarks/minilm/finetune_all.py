"""Fine-tune (or reuse) the per-task encoders and the multitask encoder. Run from the repo root:

    python benchmarks/minilm/finetune_all.py [--tasks foods spam ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import finetuned_dir, make_heads  # noqa: E402

from tiesmerge.evaluation.finetune import TrainConfig  # noqa: E402
from tiesmerge_bench import TASK_NAMES, load_suite  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=None, help="train examples per task (default: all)")
    parser.add_argument("--no-multitask", action="store_true")
    args = parser.parse_args()
    suite = load_suite(args.tasks)
    heads = make_heads(suite, args.device)
    config = TrainConfig(epochs=args.epochs)
    for name, task in suite.items():
        t0 = time.perf_counter()
        path = finetuned_dir(name, [task], heads, config, args.device, train_limit=args.train_limit)
        print(f"{name}: {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_multitask:
        t0 = time.perf_counter()
        path = finetuned_dir("multitask", list(suite.values()), heads, config, args.device,
                             train_limit=args.train_limit)
        print(f"multitask: {path} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
