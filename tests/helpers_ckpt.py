"""Builders of tiny checkpoints for the I/O, output, CLI and error tests, and the readers of
what a merge wrote.

Everything is written by the tests themselves (no network): small state dicts, Hugging Face
style directories (one ``model.safetensors`` or shards plus ``model.safetensors.index.json``,
``config.json`` and tokenizer-ish files), single ``.safetensors`` files and pickle files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiesmerge.cli.main import main

__all__ = [
    "SHAPES",
    "make_base",
    "finetune",
    "make_family",
    "write_safetensors",
    "write_hf_dir",
    "write_pickle",
    "leftovers",
    "assert_no_output",
    "load_dir",
    "assert_same_state",
    "write_layouts",
    "sign_family",
    "cli_flags",
    "run_cli",
    "TOKENIZER_FILES",
    "write_earlier_manifest",
]

# A small "transformer": embeddings, a 2-layer stack, a norm, an int64 buffer. 2-D tensors have
# enough rows that row-slice reads and chunking are exercised.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (32, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "model.layers.1.input_layernorm.weight": (8,),
    "model.norm.weight": (8,),
    "lm_head.weight": (32, 8),
}

TOKENIZER_FILES: dict[str, str] = {
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}}),
    "tokenizer_config.json": json.dumps({"model_max_length": 128}),
    "special_tokens_map.json": json.dumps({"unk_token": "a"}),
    "generation_config.json": json.dumps({"do_sample": False}),
}


# an earlier merge's manifest, as far as ``--force`` checks it (the fields tiesmerge's writer always writes,
# and the listing of every file it wrote: the names the tests put beside it)
EARLIER_MANIFEST = json.dumps({"tiesmerge_version": "0", "method": {"name": "ties"}, "inputs": {},
                               "output": {"files": ["model.safetensors"]},
                               "written": ["tiesmerge.json", "model.safetensors", "keep.txt", "x", "old.txt"]})


def write_earlier_manifest(folder: str | Path) -> Path:
    """EARLIER_MANIFEST in ``folder``, with the stamps tiesmerge records for the listed files that exist now (an
    output's own files, as its writer would have stamped them; a listed file without a stamp is not vouched for)."""
    from tiesmerge.paths import file_stamp

    folder = Path(folder)
    data = json.loads(EARLIER_MANIFEST)
    data["written_stamps"] = {rel: file_stamp(folder / rel) for rel in data["written"]
                              if rel != "tiesmerge.json" and (folder / rel).exists()}
    (folder / "tiesmerge.json").write_text(json.dumps(data))
    return folder / "tiesmerge.json"


def make_base(seed: int = 0, *, dtype: torch.dtype = torch.float32, shapes: Mapping[str, tuple[int, ...]] = SHAPES,
              with_int: bool = True) -> dict[str, torch.Tensor]:
    """A random base state dict (plus an int64 ``position_ids`` buffer when ``with_int``)."""
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}
    if with_int:
        state["model.position_ids"] = torch.arange(16, dtype=torch.int64).unsqueeze(0)
    return state


def finetune(base: Mapping[str, torch.Tensor], seed: int, *, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """The base plus a random task vector on every floating tensor (integer tensors kept)."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def make_family(n_models: int = 2, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                shapes: Mapping[str, tuple[int, ...]] = SHAPES, with_int: bool = True
                ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = make_base(seed, dtype=dtype, shapes=shapes, with_int=with_int)
    return base, [finetune(base, seed * 100 + k) for k in range(n_models)]


def write_family_dirs(tmp_path: Path, n_models: int = 2) -> tuple[Path, list[Path]]:
    """A base and ``n_models`` fine-tunes (make_family) written as HF directories base, ft0, ft1, ..."""
    base, fts = make_family(n_models)
    return write_hf_dir(tmp_path / "base", base), [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory; files hold independent copies
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_safetensors(path: str | Path, state: Mapping[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(state), str(path), metadata={"format": "pt"})
    return path


def write_hf_dir(path: str | Path, state: Mapping[str, torch.Tensor], *, shards: int = 1,
                 config: Mapping | None = None, tokenizer: bool = True, extra_files: Mapping[str, str] | None = None,
                 weight_name: str = "model.safetensors") -> Path:
    """A Hugging Face model directory: ``shards`` == 1 writes ``weight_name``, more writes
    ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards <= 1:
        save_file(_contiguous(state), str(path / weight_name), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        total = 0
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(_contiguous({k: state[k] for k in part}), str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
            total += sum(state[k].numel() * state[k].element_size() for k in part)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = {"model_type": "llama", "torch_dtype": "float32", "tie_word_embeddings": False}
    cfg.update(config or {})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        for name, text in TOKENIZER_FILES.items():
            (path / name).write_text(text)
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    return path


def write_pickle(path: str | Path, state: Mapping[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in state.items()}, path)
    return path


def leftovers(output: str | Path) -> list[Path]:
    """The output directory, if it exists, and any temporary sibling tiesmerge made for it."""
    output = Path(output).absolute()
    found = [output] if output.exists() else []
    if output.parent.is_dir():
        # temporary siblings are named for the process (.tiesmerge-tmp-...), older ones for the output
        found += sorted([*output.parent.glob(f".{output.name}.tiesmerge-*"), *output.parent.glob(".tiesmerge-*")])
    return found


def assert_no_output(output: str | Path) -> None:
    left = leftovers(output)
    assert not left, f"output or temporary directories left behind: {left}"


# ------------------------------------------------------------------ reading outputs back


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output directory: one ``model.safetensors``, or the shards of its index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(path / f))
        assert not set(part) & set(state), f"tensor in two shards: {set(part) & set(state)}"
        state.update(part)
    return state


def assert_same_state(got, want):
    """The same names, dtypes and values, bit for bit."""
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


# ------------------------------------------------------------------ one state dict in every layout


def write_layouts(tmp_path, state):
    """The same state dict in every supported on-disk layout."""
    return {
        "sharded_dir": write_hf_dir(tmp_path / "sharded", state, shards=3),
        "single_dir": write_hf_dir(tmp_path / "single", state),
        "file": write_safetensors(tmp_path / "weights.safetensors", state),
        "odd_name_dir": write_hf_dir(tmp_path / "odd", state, weight_name="weights.safetensors"),
    }


# ------------------------------------------------------------------ a reference model (--sign-from)


def sign_family(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    """(base, [t0, t1], reference) HF directories of two tensors, signs worked out by hand."""
    base = {"w": torch.zeros(3), "b": torch.ones(2)}
    t0 = {"w": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor([2.0, 1.5])}
    t1 = {"w": torch.tensor([-3.0, 1.0, 1.0]), "b": torch.tensor([1.5, 0.0])}
    ref = {"w": torch.tensor([1.0, 1.0, -1.0]), "b": torch.tensor([1.0, 0.0])}  # b: task vector 0, -1
    paths = [write_hf_dir(tmp_path / name, sd) for name, sd in (("t0", t0), ("t1", t1))]
    return write_hf_dir(tmp_path / "base", base), paths, write_hf_dir(tmp_path / "ref", ref)


# ------------------------------------------------------------------ the command line


def cli_flags(b, ms):
    """``--base B --model M1 --model M2 ...``"""
    return ["--base", str(b), *[x for m in ms for x in ("--model", str(m))]]


def run_cli(argv, capsys):
    """``tiesmerge ARGV`` in this process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def copy_model_dir(source: Path, target: Path) -> Path:
    """A byte copy of the model directory ``source`` (its regular files) at ``target``: a copy of the base under
    another path, or one to damage a file of."""
    target.mkdir(parents=True)
    for f in Path(source).iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def ray_search_process(base: Path, models: list[Path], work: Path, evaluator: str, budget: int, log_dir: Path):
    """``tiesmerge search --ray --workers 1`` (a random search over lam of ``budget`` candidates) in a process of its
    own, run from ``work`` (where the evaluator's module lies), with its output piped: for the stop-signal tests."""
    import subprocess
    import sys

    code = "import sys\nfrom tiesmerge.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    argv = ["search", "--base", str(base), *[a for m in models for a in ("--model", str(m))], "--evaluator",
            evaluator, "--strategy", "random", "--budget", str(budget), "--axis", "lam", "--ray", "--workers", "1",
            "--dir", str(log_dir)]
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
