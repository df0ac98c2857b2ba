"""`tiesmerge demo`: small synthetic fine-tunes of a Llama-shaped model, merged three ways.

Each synthetic fine-tune is the base plus small dense noise (what every fine-tune does to every
weight) plus a sparse "skill" (a few percent of entries moved a lot). Some skill entries are
shared between tasks with opposite signs: the interference TIES resolves. Because the skills
are known, the demo can say how much of each skill a merge kept.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..api import describe_plan, merge, plan_merge
from ..errors import OutputError
from ..methods import Average, TaskArithmetic, Ties
from ..paths import (
    DEMO_MARKER,
    as_if_created,
    check_output_location,
    demo_models_untouched,
    demo_models_written,
    write_error,
)
from ..sizes import format_size

__all__ = ["synthetic_llama_shapes", "make_demo_models", "run_demo"]

TASKS = ("math", "code", "chat")


def synthetic_llama_shapes(million_params: float) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a small Llama-architecture model of about ``million_params``."""
    # narrower models below 20M (and 1M) parameters: a 512-wide, 8192-token embedding alone holds 8.4M
    hidden, vocab, inter = (512, 8192, 1408) if million_params >= 20 else (128, 2048, 352) if million_params >= 1 \
        else (64, 512, 176)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((million_params * 1e6 - 2 * vocab * hidden) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _config(shapes: dict[str, tuple[int, ...]]) -> dict:
    vocab, hidden = shapes["model.embed_tokens.weight"]
    layers = sum(1 for n in shapes if n.endswith("q_proj.weight"))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0], "num_hidden_layers": layers,
            "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": vocab, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _save_hf(directory: Path, state: dict[str, torch.Tensor], config: dict, shards: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[s * per:(s + 1) * per]}
        with _written(directory / file):
            save_file(part, str(directory / file), metadata={"format": "pt"})
        as_if_created(directory / file)  # safetensors writes 0600: the umask's mode, as the other files
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with _written(directory / "model.safetensors.index.json"):
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    with _written(directory / "config.json"):
        (directory / "config.json").write_text(json.dumps(config, indent=2))


@contextmanager
def _written(path: Path) -> Iterator[None]:
    """A file of the demo's models written whole or not at all: a full disk or a file size limit (``ulimit -f``) is
    an OutputError naming the file and what ran out (safetensors says "I/O error: File too large (os error 27)",
    which reached the command as a bug, hp36 C33), and the part written is removed."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        path.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            found = re.search(r"\(os error (\d+)\)", str(exc))
            if found is None:
                raise
            exc = OSError(int(found.group(1)), os.strerror(int(found.group(1))))
        raise write_error(path, exc) from None


def make_demo_models(root: Path, million_params: float, seed: int = 0) -> tuple[Path, list[Path], dict]:
    """Write a base and one fine-tune per task; return their paths and each task's skill vectors."""
    g = torch.Generator().manual_seed(seed)
    shapes = synthetic_llama_shapes(million_params)
    config = _config(shapes)
    base = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    _save_hf(root / "base", base, config)
    skills: dict[str, dict[str, torch.Tensor]] = {t: {} for t in TASKS}
    shared_sign = {n: torch.randint(0, 2, s, generator=g).float() * 2 - 1 for n, s in shapes.items()}
    paths = []
    for t in TASKS:
        tuned = {}
        for n, s in shapes.items():
            # 4% of entries carry the skill; a third of those are a "shared" direction whose
            # sign each task flips with probability 0.4 (sign conflicts between tasks)
            support = torch.rand(s, generator=g) < 0.04
            magnitude = torch.randn(s, generator=g).abs() * 4e-3 + 1e-3
            sign = torch.where(torch.rand(s, generator=g) < 0.33,
                               shared_sign[n] * torch.where(torch.rand(s, generator=g) < 0.4, -1.0, 1.0),
                               torch.randint(0, 2, s, generator=g).float() * 2 - 1)
            skill = support * magnitude * sign
            noise = torch.randn(s, generator=g) * 3e-4  # above bf16's resolution near 0.02 (~1.2e-4)
            tuned[n] = (base[n].float() + skill + noise).to(torch.bfloat16)
            skills[t][n] = (tuned[n].float() - base[n].float()) * support  # the skill as stored in bf16
        _save_hf(root / f"ft-{t}", tuned, config)
        paths.append(root / f"ft-{t}")
    return root / "base", paths, skills


def _skill_kept(merged: dict[str, torch.Tensor], base_dir: Path, skills: dict[str, dict[str, torch.Tensor]],
                base_state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(mean over tasks of <tau_m, s_t> / ||s_t||^2, share of tau_m's energy off every skill)."""
    kept = []
    for per_tensor in skills.values():
        dot = sq = 0.0
        for n, s in per_tensor.items():
            tau_m = merged[n].float() - base_state[n].float()
            dot += float((tau_m * s).sum())
            sq += float((s * s).sum())
        kept.append(dot / sq)
    off = total = 0.0
    for n in base_state:
        tau_m = merged[n].float() - base_state[n].float()
        on = torch.zeros_like(tau_m, dtype=torch.bool)
        for per_tensor in skills.values():
            on |= per_tensor[n] != 0
        off += float((tau_m[~on] ** 2).sum())
        total += float((tau_m**2).sum())
    return sum(kept) / len(kept), off / max(total, 1e-30)


METHODS = (("ties  (density 0.2, lam 1.0)", Ties()), ("task_arithmetic (lam 0.4)", TaskArithmetic()),
           ("average", Average()))


def _as_demo(exc: OutputError) -> OutputError:
    """A refusal to replace a merged model of an earlier demo, worded for the demo, which replaces them on each
    run and has no --force: the same reason, the demo named where the check names --force."""
    hint = exc.hint.replace("choose another path", "choose another --workdir") if exc.hint else None
    return OutputError(exc.message.replace("--force (force=True)", "the demo").replace("--force", "the demo"),
                       hint=hint)


def _check_merged_outputs(root: Path) -> None:
    """Each merged model the demo will replace, checked before the models are made (not after)."""
    for _, method in METHODS:
        output = root / f"merged-{method.name}"
        if os.path.islink(output):  # the demo writes its merged models itself: a link there is someone's (hp33 C59)
            raise OutputError(f"{output}: a link (to {os.readlink(output)!r}) where the demo writes its merged "
                              f"{method.name} model; the demo replaces only what it wrote",
                              hint="remove the link, or name a new or empty --workdir")
        try:
            check_output_location(output, True)
        except OutputError as exc:
            raise _as_demo(exc) from None


def _space_needed(root: Path, million_params: float) -> tuple[int, int]:
    """(bytes the demo's files need at their peak, bytes of an earlier demo's files here that it replaces).

    From the model's real size (the synthetic shapes round the layer count: counting ``million_params`` missed a
    tenth of a small model, and the merges were missed too, hp37 C32): the base and fine-tunes in bf16, then each
    merged model, written beside the earlier demo's one before that is removed. An earlier demo's files are
    replaced, so their space counts as free (a rerun on the same small disk was refused, hp37 C33)."""
    model = 2 * sum(math.prod(shape) for shape in synthetic_llama_shapes(million_params).values())  # bf16 bytes
    replaced = 0
    for folder, _, files in os.walk(root):  # demo_workdir let only an earlier demo's own files be here
        replaced += sum(os.lstat(os.path.join(folder, f)).st_size for f in files if f != DEMO_MARKER)
    merged_before = any(e.startswith("merged-") for e in os.listdir(root))
    return model * (1 + len(TASKS) + len(METHODS) + int(merged_before)), replaced


def _free_bytes(root: Path) -> int:
    return shutil.disk_usage(root).free


def run_demo(workdir: str | None = None, million_params: float = 50.0) -> int:
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tiesmerge-demo-"))
    try:
        needed, replaced = _space_needed(root, million_params)
        free = _free_bytes(root)
        if needed > free + replaced:  # a --workdir this run made is removed by the command (cmd_demo), a temporary
            if not workdir:  # one here: the finally below is not reached yet
                shutil.rmtree(root, ignore_errors=True)
            mine = f" (and {format_size(replaced)} of the earlier demo's files it replaces)" if replaced else ""
            raise OutputError(f"{root}: the demo's models and merges need {format_size(needed)} but only "
                              f"{format_size(free)} is free there{mine}",
                              hint="a smaller --params, or a --workdir on a larger disk")
        _check_merged_outputs(root)
    except BaseException:  # refused before any model was written: the marker as the earlier demo left it, not
        if workdir:  # "writing" (hp85b c36: the next demo then overwrote a base/config.json edited meanwhile)
            demo_models_untouched(root)
        raise
    try:
        for _, method in METHODS:  # an earlier demo's merges go before its models are rewritten: a demo stopped
            # midway leaves new models beside no merge, never beside merges of other models (hp38 C21)
            if os.path.isdir(root / f"merged-{method.name}"):
                shutil.rmtree(root / f"merged-{method.name}")
        actual = sum(math.prod(shape) for shape in synthetic_llama_shapes(million_params).values()) / 1e6
        print(f"tiesmerge demo: {len(TASKS)} synthetic fine-tunes ({', '.join(TASKS)}) of a "
              f"{actual:.3g}M-parameter Llama-shaped bf16 model, in {root}")
        t0 = time.perf_counter()
        base_dir, model_dirs, skills = make_demo_models(root, million_params)
        demo_models_written(root)  # a later demo replaces these files only while they are unchanged
        print(f"  made the models in {time.perf_counter() - t0:.1f} s: each = base + dense noise + a sparse skill "
              "(4% of entries, a third of them in sign conflict across tasks)\n")
        print("plan of the TIES merge (tiesmerge merge --dry-run):")
        print("  " + describe_plan(plan_merge(base_dir, model_dirs, Ties()), Ties(), len(model_dirs))
              .replace("\n", "\n  ") + "\n")
        from safetensors.torch import load_file

        base_state: dict[str, torch.Tensor] = {}
        for f in sorted(base_dir.glob("*.safetensors")):
            base_state.update(load_file(str(f)))
        rows = []
        for label, method in METHODS:
            out = root / f"merged-{method.name}"
            t0 = time.perf_counter()
            try:
                merge(base_dir, model_dirs, method, output=out, force=True)
            except OutputError as exc:  # a file added while the demo ran: the same refusal, in the demo's words
                raise _as_demo(exc) from None
            seconds = time.perf_counter() - t0
            merged: dict[str, torch.Tensor] = {}
            for f in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(f)))
            kept, off = _skill_kept(merged, base_dir, skills, base_state)
            read = json.loads((out / "tiesmerge.json").read_text())["engine"]["bytes_read"]
            rows.append((label, seconds, read, kept, off))
        print(f"{'method':<30} {'seconds':>8} {'read':>11} {'skill kept':>11} {'energy off-skill':>17}")
        for label, seconds, read, kept, off in rows:
            print(f"{label:<30} {seconds:>8.2f} {format_size(read):>11} {kept:>11.2f} {off:>17.1%}")
        print("\nskill kept: mean over tasks of <tau_merged, skill_t> / ||skill_t||^2 (1.00 = each task's skill fully"
              " present);\nenergy off-skill: share of the merged task vector that is fine-tuning noise, not a skill.")
        print(f"merged models are HF directories under {root} (config, model card README.md, tiesmerge.json)."
              if workdir else "(run with --workdir DIR to keep the models)")
        return 0
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
