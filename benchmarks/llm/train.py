"""Prompted-classification fine-tuning of a causal LM on CPU: full and LoRA.

The loss is the answer's negative log-likelihood given the prompt (cross-entropy on the answer
tokens only), the same quantity rank classification compares between the choices.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainConfig:
    mode: str  # "full" or "lora"
    steps: int
    lr: float
    batch_size: int = 8
    seed: int = 0
    warmup: float = 0.1  # fraction of the steps, linear warm-up then linear decay
    rank: int = 8  # LoRA only
    alpha: int = 16


def _batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """(prompt, answer) pairs -> input_ids, attention_mask and labels (-100 outside the answer)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels])}


def train(model, tokenizer, examples, config: TrainConfig, log_every: int = 10) -> dict:
    """Fine-tune ``model`` in place on ChoiceExamples (the gold choice is the target); return the log."""
    torch.manual_seed(config.seed)
    order = random.Random(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warm = max(1, int(config.warmup * config.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (config.steps - s) / max(1, config.steps - warm))))
    pool: list = []
    losses, started = [], time.perf_counter()
    model.train()
    for step in range(config.steps):
        if len(pool) < config.batch_size:
            fresh = list(examples)
            order.shuffle(fresh)
            pool += fresh
        chunk, pool = pool[:config.batch_size], pool[config.batch_size:]
        batch = _batch(tokenizer, [(ex.prompt, ex.choices[ex.label]) for ex in chunk])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}/{config.steps} loss {sum(losses[-log_every:]) / log_every:.3f} "
                  f"({(time.perf_counter() - started) / (step + 1):.2f} s/step)", flush=True)
    model.eval()
    seconds = time.perf_counter() - started
    return {"config": asdict(config), "losses": losses, "seconds": seconds, "s_per_step": seconds / config.steps}


def finetune_to(out: Path, base: Path, examples, config: TrainConfig) -> Path:
    """Train one model (full: an HF directory; LoRA: a PEFT adapter directory) unless ``out`` holds it."""
    done = out / "train_log.json"
    if done.is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, init_lora_weights=True))
    log = train(model, tokenizer, examples, config)
    tmp = out.with_name(out.name + ".part")
    model.save_pretrained(tmp)
    if config.mode == "full":
        tokenizer.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(log) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
