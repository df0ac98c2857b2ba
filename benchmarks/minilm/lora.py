"""LoRA adapters per task, merged by tiesmerge and by PEFT. Run from the repo root:

    python benchmarks/minilm/lora.py                  # trains (or reuses) 8 adapters, merges, evaluates
    python benchmarks/minilm/lora.py --device cuda

A rank-8 LoRA (α = 16) on every attention projection (query, key, value, attention output) and
both MLP projections (intermediate, output) of all-MiniLM-L6-v2 is trained per task against the
frozen cosine heads (benchmarks/minilm, same data and splits). The adapters are then merged:

- by tiesmerge on the real weight changes ΔW = (α/r)·B·A: TIES with global scope (the paper),
  TIES per tensor, task arithmetic; and TIES global written back as a rank-8 LoRA (SVD);
- by PEFT's ``add_weighted_adapter`` with ``ties`` and ``dare_ties``, which merge the A and the B
  factors separately (PEFT's documented behaviour for these combination types).

Writes benchmarks/results/lora.md + .json. Adapters are cached under
~/.cache/tiesmerge/bench/lora/, evaluations under ~/.cache/tiesmerge/bench/evals/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import base_dir, hardware, load_encoder, make_heads  # noqa: E402
from run import EvalCache, log  # noqa: E402

import tiesmerge  # noqa: E402
from tiesmerge.evaluation import ResultRow, ResultsTable, SuiteResult, evaluate_encoder  # noqa: E402
from tiesmerge.evaluation.finetune import TrainConfig, finetune  # noqa: E402
from tiesmerge.methods import TaskArithmetic, Ties  # noqa: E402
from tiesmerge_bench import TASK_NAMES, load_suite  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGETS = ["query", "key", "value", "dense"]  # BERT: dense = attention output, intermediate, output (MLP)
RANK, ALPHA = 8, 16


def lora_dir(task, heads, config: TrainConfig, device: str, train_limit: int | None) -> Path:
    """Train (or reuse) one task's LoRA adapter; return its PEFT directory."""
    from peft import LoraConfig, get_peft_model

    digest = hashlib.sha256(json.dumps({**asdict(config), "rank": RANK, "alpha": ALPHA, "targets": TARGETS,
                                        "max_length": common.MAX_LENGTH, "train_limit": train_limit},
                                       sort_keys=True).encode())
    for text, label in task.train[:train_limit]:
        digest.update(text.encode())
        digest.update(str(label).encode())
    out = common.CACHE / "lora" / f"{task.name}-{digest.hexdigest()[:12]}"
    if (out / "adapter_model.safetensors").is_file() and (out / "train_log.json").is_file():
        return out
    encoder = load_encoder(base_dir(), device)
    encoder.model = get_peft_model(encoder.model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                             lora_dropout=0.0))
    result = finetune(encoder, heads, {task.name: task.train[:train_limit]}, config)
    tmp = out.with_name(out.name + ".tmp")
    encoder.model.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps({**asdict(result), "config": asdict(config)}, indent=2))
    tmp.rename(out)
    log(f"  [{task.name}] LoRA trained: {result.steps} steps, {result.seconds:.0f} s, loss {result.final_loss:.3f}")
    return out


def peft_merge(adapters: dict[str, Path], combination: str, density: float, device: str) -> dict:
    """PEFT's add_weighted_adapter over every task's adapter (weights 1), merged into the base."""
    from peft import PeftModel

    names = list(adapters)
    encoder = load_encoder(base_dir(), device)
    model = PeftModel.from_pretrained(encoder.model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=combination, density=density)
    model.set_adapter("merged")
    return {k: v.detach().clone() for k, v in model.merge_and_unload(adapter_names=["merged"]).state_dict().items()}


def own_adapter_state(adapter: Path, device: str) -> dict:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_encoder(base_dir(), device).model, adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate (full fine-tuning uses 3e-5)")
    p.add_argument("--train-limit", type=int, default=None, help="train examples per task (default all: 2000)")
    p.add_argument("--test-limit", type=int, default=None, help="test examples per task (default all: 1000)")
    p.add_argument("--density", type=float, default=0.2, help="k for every TIES/DARE row (paper default 0.2)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    suite = load_suite(args.tasks, seed=args.seed)
    tasks = list(suite)
    test = {t: suite[t].test[:args.test_limit] for t in tasks}
    heads = make_heads(suite, args.device)
    seconds["data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
    adapters = {t: lora_dir(suite[t], heads, config, args.device, args.train_limit) for t in tasks}
    seconds["train_lora"] = time.perf_counter() - clock
    base = base_dir()

    settings = json.dumps(["lora", common.MAX_LENGTH, args.train_limit, args.test_limit, args.seed, args.epochs,
                           args.lr, args.density, [str(d) for d in adapters.values()]])
    cache = EvalCache(common.CACHE / "evals" / f"lora-{hashlib.sha256(settings.encode()).hexdigest()[:12]}.json")

    def evaluate_state(state) -> SuiteResult:
        return evaluate_encoder(load_encoder(base, args.device, state=state), test, heads)

    def accuracy(key: str, compute) -> SuiteResult:
        return SuiteResult(cache.get(key, lambda: dict(compute().accuracy)))

    table = ResultsTable(tasks=tasks, reference="individual LoRA")
    merge_seconds: dict[str, float] = {}
    clock = time.perf_counter()
    table.add(ResultRow("zero-shot", accuracy("zero-shot", lambda: evaluate_state(None))))
    table.add(ResultRow("individual LoRA", accuracy("individual", lambda: SuiteResult({
        t: evaluate_encoder(load_encoder(base, args.device, state=own_adapter_state(adapters[t], args.device)),
                            {t: test[t]}, heads).accuracy[t] for t in tasks})), note="each task's own adapter"))
    log(f"zero-shot {table.rows[0].result.mean:.3f}, individual LoRA {table.rows[1].result.mean:.3f}")

    k = args.density
    models = [adapters[t] for t in tasks]
    tiesmerge_rows = [
        ("tiesmerge TIES, global", f"ΔW, k={k}, λ=1", Ties(density=k, lam=1.0)),
        ("tiesmerge TIES, per tensor", f"ΔW, k={k}, λ=1", Ties(density=k, lam=1.0, scope="per_tensor")),
        ("tiesmerge task arithmetic", "ΔW, λ=0.4", TaskArithmetic(lam=0.4)),
    ]
    for label, note, method in tiesmerge_rows:
        def run(method=method, label=label):
            started = time.perf_counter()
            state = tiesmerge.merge(base, models, method, device=args.device)
            merge_seconds[label] = time.perf_counter() - started
            return evaluate_state(state)

        table.add(ResultRow(label, accuracy(f"tiesmerge:{label}", run), note=note))
        log(f"{label}: {table.rows[-1].result.mean:.3f}")

    # TIES global written back as a rank-8 LoRA adapter (truncated SVD of each module's τ_m)
    svd_info: dict = {}

    def run_svd():
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            out = tiesmerge.merge(base, models, Ties(density=k, lam=1.0), output=Path(tmp) / "adapter",
                                  output_format="adapter", rank=RANK)
            merge_seconds["tiesmerge TIES, global -> LoRA r=8"] = time.perf_counter() - started
            errors = json.loads((out / "tiesmerge.json").read_text())["adapters"]["relative_reconstruction_error"]
            svd_info.update(max_error=max(errors.values()), mean_error=sum(errors.values()) / len(errors))
            model = PeftModel.from_pretrained(load_encoder(base, args.device).model, out)
            state = {k2: v.detach().clone() for k2, v in model.merge_and_unload().state_dict().items()}
        result = evaluate_state(state)
        return SuiteResult({**result.accuracy, "_svd_max_error": svd_info["max_error"],
                            "_svd_mean_error": svd_info["mean_error"]})

    svd = cache.get("tiesmerge:svd", lambda: dict(run_svd().accuracy))
    svd_errors = {key: svd.pop(key) for key in list(svd) if key.startswith("_")}
    table.add(ResultRow("tiesmerge TIES, global → LoRA r=8", SuiteResult(svd),
                        note=f"SVD, rel. error mean {svd_errors['_svd_mean_error']:.2f}, "
                             f"max {svd_errors['_svd_max_error']:.2f}"))
    log(f"TIES -> LoRA r=8: {table.rows[-1].result.mean:.3f} ({svd_errors})")

    for combination in ("ties", "dare_ties"):
        def run_peft(combination=combination):
            torch.manual_seed(args.seed)  # dare_ties draws its masks from torch's global generator
            started = time.perf_counter()
            state = peft_merge(adapters, combination, k, args.device)
            merge_seconds[f"PEFT {combination}"] = time.perf_counter() - started
            return evaluate_state(state)

        table.add(ResultRow(f"PEFT add_weighted_adapter {combination}",
                            accuracy(f"peft:{combination}", run_peft), note=f"A and B merged apart, density={k}"))
        log(f"PEFT {combination}: {table.rows[-1].result.mean:.3f}")
    seconds["merge_and_evaluate"] = time.perf_counter() - clock

    train_logs = {t: json.loads((adapters[t] / "train_log.json").read_text()) for t in tasks}
    table.meta = {"protocol": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "lr": args.lr, "epochs": args.epochs,
                               "train_limit": args.train_limit, "test_limit": args.test_limit,
                               "max_length": common.MAX_LENGTH, "density": k, "seed": args.seed},
                  "train_seconds": {t: round(v["seconds"], 1) for t, v in train_logs.items()},
                  "merge_seconds": {k2: round(v, 2) for k2, v in merge_seconds.items()},
                  "svd_relative_error": svd_errors, "seconds": {k2: round(v, 1) for k2, v in seconds.items()},
                  "evaluations_reused": cache.reused, "hardware": hardware(),
                  "adapters": {t: str(d) for t, d in adapters.items()}}
    preamble = (
        "# LoRA adapters merged: tiesmerge on ΔW vs PEFT's add_weighted_adapter\n\n"
        f"all-MiniLM-L6-v2, one rank-{RANK} LoRA (α={ALPHA}) per task on the attention (query, key, value, "
        "output) and MLP (intermediate, output) projections, trained against frozen cosine heads "
        f"({args.epochs} epochs, lr {args.lr}, {args.train_limit or 'all'} train examples per task, "
        f"{common.MAX_LENGTH}-token inputs); test accuracy (%) on {args.test_limit or 1000} examples per task. "
        "No validation: TIES k and λ are the paper's defaults, task arithmetic λ = 0.4. "
        "Normalized mean is against each task's own adapter.\n\n"
    )
    epilogue = (
        "\ntiesmerge merges the real weight changes ΔW = (α/r)·B·A of each module (global scope: one top-k "
        "threshold per adapter over all its ΔW entries); PEFT's `ties` and `dare_ties` combinations trim, elect "
        "and average the A and the B factors separately, so the merged update is a product of merged factors. "
        f"Generated by `benchmarks/minilm/lora.py` on {hardware()['cpu_count']} CPU cores; training "
        f"{seconds['train_lora']:.0f} s this run (0 when every adapter is cached), merges and evaluation "
        f"{seconds['merge_and_evaluate']:.0f} s.\n"
    )
    table.write(args.out / "lora.md", args.out / "lora.json", preamble=preamble, epilogue=epilogue)
    print(table.to_markdown())


if __name__ == "__main__":
    main()
