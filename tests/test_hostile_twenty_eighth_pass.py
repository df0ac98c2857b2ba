"""The twenty-eighth hostile pass (issue 13): adapter configs and files that cost minutes to check (pattern tables of
100,000 shapes, 40,000 factor pairs, 15,000 saved copies on 4,000-character paths, slow selectors over every module),
and its notes (a weight of 1000 under lam 1, a size of 400 digits)."""

from __future__ import annotations

import pytest
import torch

from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import make_base, run_cli, write_family_dirs, write_hf_dir
from tiesmerge.errors import CheckpointError, IncompatibleCheckpointsError
from tiesmerge.io import patterns, peft_targets
from tiesmerge.io.patterns import MAX_SHAPES, PatternTable
from tiesmerge.io.peft import BaseNames
from tiesmerge.io.peft_targets import Targeting, check_adapted


def _table(keys):
    return PatternTable({k: i + 1 for i, k in enumerate(keys)}, "alpha_pattern", "cfg", lambda v, what: float(v))


def test_a_pattern_table_of_too_many_key_shapes_is_refused():
    """F1: 100,000 module-name keys, each of another shape (part lengths): every shape was a lookup per tail."""
    keys = [f"{'a' * (1 + i % 40)}.{'b' * (1 + i // 40)}" for i in range(MAX_SHAPES + 1)]
    with pytest.raises(CheckpointError, match=f"alpha_pattern's module-name keys come in {MAX_SHAPES + 1:,} shapes"):
        _table(keys)
    table = _table(keys[:MAX_SHAPES])  # within the bound: each key still found, its '.' any character
    assert table.lookup("model.layers.0." + keys[5]) == 6
    assert table.lookup("model.layers.0." + keys[5].replace(".", "_")) == 6
    assert table.lookup("model.layers.0." + keys[5].replace("a", "c")) is None


def test_a_pattern_table_has_a_time_budget_over_all_modules(monkeypatch):
    """F5's family: a regex key that is slow on every module ends in an error naming the field."""
    monkeypatch.setattr(patterns, "TOTAL_SECONDS", 0.0)
    table = _table([r"(a|b)*\.q_proj", "v_proj"])
    with pytest.raises(CheckpointError, match="cfg: alpha_pattern took more than 0 s to match"):
        table.lookup("model.layers.0.self_attn.q_proj")


def test_a_selector_slow_on_every_long_path_is_stopped_at_once():
    """F5: target_modules '(?:.*){2400}q' (4,803 automaton states) on 60 paths of 4,000 characters took 6 minutes."""
    modules = [(("x" * 15 + ".") * 250 + f"m{i}.q_proj")[-4000:] for i in range(60)]
    with pytest.raises(CheckpointError, match="cfg: target_modules takes more than 0.05 s to match the module"):
        check_adapted({"target_modules": r"(?:.*){2400}q"}, modules, "cfg")
    check_adapted({"target_modules": r".*\.(q_proj|v_proj)"}, modules, "cfg")  # a real one: matched in C


def test_layers_pattern_entries_share_one_budget():
    """F3: 900 layers_pattern entries of ~16 ms each had 2 s each (30 minutes over 40 modules)."""
    targeting = Targeting.of({"target_modules": ["q_proj"], "layers_to_transform": [0],
                              "layers_pattern": ["layers", "h", "blocks"]}, "cfg")
    clocks = {id(t.clock) for t in targeting.layer_lists}
    assert len(targeting.layer_lists) == 3 and len(clocks) == 1


class _CountingList(list):
    """A names() list that counts the membership tests made on it (each one a scan of the list)."""

    scans = 0

    def __contains__(self, item):
        type(self).scans += 1
        return super().__contains__(item)


def test_a_lora_adapter_of_many_factor_pairs_is_read_in_linear_time(tmp_path, monkeypatch):
    """F2: each A factor's B was looked up in the list of keys: 40,000 pairs took 31 s, 80,000 took 193 s."""
    from tiesmerge.io import adapters, safetensors_reader

    base = make_base()
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4)
    real = safetensors_reader.SafetensorsCheckpoint.names
    monkeypatch.setattr(safetensors_reader.SafetensorsCheckpoint, "names", lambda self: _CountingList(real(self)))
    _CountingList.scans = 0
    adapter = adapters.LoraCheckpoint(lora, "lora")
    assert adapter._factors and _CountingList.scans == 0


class _Base:
    """A checkpoint of names only, counting names() calls."""

    label = "base"

    def __init__(self, names):
        self._names, self.calls = list(names), 0

    def names(self):
        self.calls += 1
        return list(self._names)


def test_base_names_are_indexed_once_per_binding():
    """F2/F4: every module copied the base's names into a set, and tried every tail of a 4,000-character path."""
    base = _Base(["model.layers.0.self_attn.q_proj.weight", "wrapper.lm_head.weight", "a.norm.weight",
                  "b.norm.weight"])
    names = BaseNames(base)
    assert names.resolve("model.layers.0.self_attn.q_proj", ".weight", "ad", "k") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert names.resolve("head.model.layers.0.self_attn.q_proj", ".weight", "ad", "k") == \
        "model.layers.0.self_attn.q_proj.weight"  # a task head wrapper's leading components dropped
    assert names.resolve("lm_head", ".weight", "ad", "k") == "wrapper.lm_head.weight"  # the base under a wrapper
    long = "x." * 2000 + "model.layers.0.self_attn.q_proj"
    assert names.resolve(long, ".weight", "ad", "k") == "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(IncompatibleCheckpointsError, match="has 2 tensors ending in 'norm.weight'"):
        names.resolve("norm", ".weight", "ad", "k")
    with pytest.raises(IncompatibleCheckpointsError, match="has no tensor 'mlp.up_proj.weight'"):
        names.resolve("mlp.up_proj", ".weight", "ad", "k")
    assert base.calls == 1


def test_saved_copies_are_judged_against_modules_to_save_once(monkeypatch):
    """F4: modules_to_save was re-read, and every tail of the path looked up, for each of 15,000 saved copies."""
    calls = []
    real = peft_targets._saved_entries
    monkeypatch.setattr(peft_targets, "_saved_entries", lambda config: calls.append(1) or real(config))
    config = {"target_modules": ["q_proj"], "modules_to_save": ["head", "norm"]}
    whole = [("p" * 15 + ".") * 200 + f"m{i}.myhead" for i in range(200)]
    check_adapted(config, ["a.q_proj"], "cfg", whole=whole)  # PEFT: key.endswith(entry), no '.' boundary
    assert len(calls) <= 2  # Targeting's modules_to_save, and the saved copies' check
    with pytest.raises(IncompatibleCheckpointsError, match="modules_to_save does not name it"):
        check_adapted(config, ["a.q_proj"], "cfg", whole=["model.heads"])


def test_modules_to_save_compared_as_names_keeps_whole_components():
    """The fallback for modules_to_save too long to run as one regex: an entry with dots names whole components."""
    entries = [f"layers.{i}.mlp" for i in range(2000)] + ["lm_head"]
    targeting = Targeting.of({"target_modules": ["up_proj", "q_proj"], "modules_to_save": entries}, "cfg")
    assert "modules_to_save" in targeting.unchecked
    assert targeting.saved.holds("model.layers.7.mlp.up_proj")
    assert targeting.saved.holds("model.lm_head")
    assert not targeting.saved.holds("model.layers.7.mlpx.up_proj")
    assert not targeting.saved.holds("model.xlayers.7.mlp.up_proj")


def test_a_weight_of_1000_under_lam_1_warns_like_lam_1000(tmp_path, capsys):
    """N1: task_arithmetic --lam 1 --weights 1000 1000 is lam 1000, which warned; the weights said nothing."""
    b, ms = write_family_dirs(tmp_path)
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(ms[0]),
                          "--model", str(ms[1]), "--lam", "1", "--weights", "1", "-300", "-o", str(tmp_path / "o")],
                         capsys)
    assert rc == 0 and "lam = 1 times model 1's weight -300 scales its task vector 300 times" in err, err
    rc, _, err = run_cli(["merge", "--method", "ties", "--base", str(b), "--model", str(ms[0]),
                          "--model", str(ms[1]), "--weights", "1000", "1000", "-o", str(tmp_path / "t")], capsys)
    assert rc == 0 and "scales" not in err, err  # ties' weighted mean divides by the weights


def test_a_size_of_400_digits_is_a_typed_error(tmp_path):
    """N3: memory_budget=10**400 through the API raised OverflowError from float()."""
    import tiesmerge
    from tiesmerge.errors import ConfigError

    b, ms = write_family_dirs(tmp_path)
    for option in ("memory_budget", "shard_size"):
        with pytest.raises(ConfigError, match=f"{option}: .*an integer of 401 digits is past any size"):
            tiesmerge.merge(b, ms, "ties", output=tmp_path / "o", **{option: 10**400})
    assert not (tmp_path / "o").exists()


def test_a_lora_with_a_wrapped_base_still_binds(tmp_path, capsys):
    """BaseNames' tail index: a base saved under a wrapper prefix binds as before."""
    base = make_base()
    wrapped = {f"wrap.{k}": v for k, v in base.items()}
    b = write_hf_dir(tmp_path / "base", wrapped)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4)
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(lora),
                          "-o", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(wrapped)
    assert any(not torch.equal(merged[k], wrapped[k]) for k in merged)  # the adapter's change landed


def test_one_demo_refusal_names_every_file_in_the_way(tmp_path, capsys):
    """N2: a file added in base/ and one in merged-ties/: the refusal named base/'s, and only a second run the other."""
    wd = tmp_path / "wd"
    assert run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)[0] == 0
    (wd / "base" / "mynote.txt").write_text("mine")
    (wd / "merged-ties" / "mynote.txt").write_text("mine too")
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc != 0 and "base/mynote.txt" in err and "merged-ties/ (the demo would delete 1 file(s)" in err, err
    assert (wd / "base" / "mynote.txt").read_text() == "mine"
    assert (wd / "merged-ties" / "mynote.txt").read_text() == "mine too"


def test_modules_to_save_too_long_to_run_is_not_compiled_entry_by_entry(monkeypatch):
    """F6: 3,000 regex entries of ~18,000 characters each (under the per-selector bound, far past it joined): each was
    compiled alone to name an invalid one, 3 minutes before the "not checked" warning."""
    compiled = []
    real = peft_targets._compiles
    monkeypatch.setattr(peft_targets, "_compiles", lambda value: compiled.append(value) or real(value))
    entries = [f"(x{i}|" + "|".join(f"a{j}" for j in range(3000)) + ")" for i in range(30)]
    targeting = Targeting.of({"target_modules": ["q_proj"], "modules_to_save": entries}, "cfg")
    assert targeting.unchecked == ("modules_to_save",) and not compiled
    with pytest.raises(CheckpointError, match="modules_to_save: pattern key 'x\\)' is not a valid regular expression"):
        Targeting.of({"target_modules": ["q_proj"], "modules_to_save": ["x)", "y.z"]}, "cfg")  # short: named


def _adapter_refused(tmp_path, capsys, path):
    from helpers_ckpt import assert_no_output

    b = write_hf_dir(tmp_path / "base", make_base())
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(path),
                          "-o", str(tmp_path / "out")], capsys)
    assert rc != 0 and "Traceback" not in err
    assert_no_output(tmp_path / "out")
    return err


@pytest.mark.parametrize("stray", ["base_model.model.zzz.", "base_model.model.base_model.model.", ""])
def test_a_module_stored_twice_in_a_lora_is_refused(tmp_path, capsys, stray):
    """hp29 F1: a stray copy of a module's factors under another prefix (zzz.model.layers.0...) bound to the same base
    tensor as the real one: the file's order decided which one was merged. Also the key without PEFT's prefix."""
    from safetensors.torch import load_file, save_file

    base = make_base()
    factors = random_lora(base, 2, seed=1)
    module, (a, b) = next(iter(factors.items()))
    path = write_lora_dir(tmp_path / "lora", factors, alpha=4)
    weights = load_file(str(path / "adapter_model.safetensors"))
    weights.update({f"{stray}{module}.lora_A.weight": a * 3, f"{stray}{module}.lora_B.weight": b * 3})
    save_file(weights, str(path / "adapter_model.safetensors"))
    err = _adapter_refused(tmp_path, capsys, path)
    assert module in err and ("both bind to the base tensor" in err or "are both the adapter's tensor" in err), err


def test_a_saved_copy_stored_twice_is_refused(tmp_path, capsys):
    base = make_base()
    norm = next(k for k in base if k.endswith("norm.weight"))
    copy = {norm.replace(".weight", ".modules_to_save.default.weight"): base[norm] + 1,
            "zzz." + norm.replace(".weight", ".modules_to_save.default.weight"): base[norm] + 2}
    path = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4, extra=copy,
                          config={"modules_to_save": [norm.split(".")[-2]]})
    assert "both bind to the base tensor" in _adapter_refused(tmp_path, capsys, path)


def test_an_ia3_vector_stored_twice_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from helpers_adapters import random_ia3, write_ia3_dir

    path = write_ia3_dir(tmp_path / "ia3", random_ia3(make_base(), seed=1))
    weights = load_file(str(path / "adapter_model.safetensors"))
    key = next(iter(weights))
    weights[key.replace("base_model.model.", "base_model.model.zzz.")] = weights[key] * 3
    save_file(weights, str(path / "adapter_model.safetensors"))
    assert "both bind to the base tensor" in _adapter_refused(tmp_path, capsys, path)


@pytest.mark.parametrize("method, warns", [("breadcrumbs", True), ("breadcrumbs_ties", True), ("della_linear", True),
                                           ("ties:aggregate=sum", True), ("ties", False), ("della", False),
                                           ("dare_ties", False)])
def test_a_weight_scaling_a_task_vector_past_100_warns_where_weights_multiply(tmp_path, capsys, method, warns):
    """hp29 N1: breadcrumbs, breadcrumbs_ties and della_linear with --weights 1 1000 scaled a task vector ~1000 times
    without the warning; a weighted mean (ties, della by default) divides the weights out. Models counted from 0."""
    name, _, option = method.partition(":")
    extra = ["--" + option.split("=")[0], option.split("=")[1]] if option else []
    b, ms = write_family_dirs(tmp_path)
    rc, _, err = run_cli(["merge", "--method", name, *extra, "--base", str(b), "--model", str(ms[0]), "--model",
                          str(ms[1]), "--lam", "1", "--weights", "1", "1000", "-o", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert ("lam = 1 times model 1's weight 1000 scales its task vector 1000 times" in err) == warns, err


def test_rank_with_ia3_adapters_is_refused(tmp_path, capsys):
    """hp29 F3: --rank 4 with (IA)³ inputs and --output-format adapter was silently ignored."""
    from helpers_adapters import random_ia3, write_ia3_dir
    from helpers_ckpt import assert_no_output

    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    adapters = [str(write_ia3_dir(tmp_path / f"ia{k}", random_ia3(base, seed=k))) for k in (1, 2)]
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", adapters[0], "--model", adapters[1],
                          "--output-format", "adapter", "--rank", "4", "-o", str(tmp_path / "out")], capsys)
    assert rc != 0 and "rank 4 applies to a merged LoRA adapter only, and the inputs are (IA)³ adapters" in err, err
    assert_no_output(tmp_path / "out")


def test_a_demo_stopped_while_writing_its_models_runs_again_there(tmp_path, capsys, monkeypatch):
    """hp29 F2: a demo killed while writing base/ left files its marker had not recorded yet: the rerun refused them
    as "files the earlier demo did not write"; and a stopped demo said "no output directory was left behind"."""
    from tiesmerge.cli import demo
    from tiesmerge.paths import demo_workdir

    wd = demo_workdir(tmp_path / "wd")  # the marker says a demo is writing; then it was killed mid-base/
    (wd / "base").mkdir()
    (wd / "base" / "config.json").write_text("{")
    (wd / "base" / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 10)
    rc, out, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc == 0, err
    (wd / "base" / "mynote.txt").write_text("mine")  # a user's file is still refused
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc != 0 and "base/mynote.txt" in err, err
    (wd / "base" / "mynote.txt").unlink()

    def stopped(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", stopped)
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc == 130 and f"interrupted; the models written so far stay in {wd}" in err, err
    monkeypatch.undo()
    b, ms = write_family_dirs(tmp_path)
    monkeypatch.setattr("tiesmerge.api.merge", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "-o",
                          str(tmp_path / "o")], capsys)
    assert rc == 130 and "no output directory was left behind" in err, err  # the next command: its own words


def test_search_notes_of_the_twenty_ninth_pass():
    """hp29 N4: an integer axis over 0.5:0.7 tried seed=1 (outside the range), and 0.4:1 could try 0; N5: an option
    named by --axis and --range was refused twice in one message."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match="seed takes whole numbers, and 0.5:0.7 holds none"):
        build_space("dare_ties", 2, axes=["seed"], ranges={"seed": (0.5, 0.7)})
    space = build_space("dare_ties", 2, axes=["seed"], ranges={"seed": (0.4, 1.0)})
    assert {space.axes[0].value([u]) for u in (0.0, 0.1, 0.5, 1.0)} == {1}
    with pytest.raises(ConfigError) as caught:
        build_space("dare_ties", 2, axes=["densities"], ranges={"densities": (0.0, 0.5)})
    assert str(caught.value).count("has no numeric or per-model option 'densities'") == 1, str(caught.value)


def test_a_lora_on_a_tied_head_is_named_as_such(tmp_path, capsys):
    """hp29 N6: a LoRA on lm_head of a base that ties it to its embedding was blamed on "another base model"."""
    base = {k: v for k, v in make_base().items() if k != "lm_head.weight"}  # tied: the head is the embedding
    b = write_hf_dir(tmp_path / "base", base, config={"model_type": "llama", "tie_word_embeddings": True})
    g = torch.Generator().manual_seed(0)
    factors = {"lm_head": (torch.randn(2, 8, generator=g), torch.randn(32, 2, generator=g))}
    lora = write_lora_dir(tmp_path / "lora", factors, alpha=4)
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(lora), "-o",
                          str(tmp_path / "out")], capsys)
    assert rc != 0 and "ties the head to its input embedding 'model.embed_tokens.weight'" in err, err
    assert "another base model" not in err


@pytest.mark.parametrize("flags, said", [(["--fisher", "empirical"], "--fisher applies"),
                                         (["--per-example", "vmap", "--fisher", "batched"],
                                          "--fisher and --per-example apply")])
def test_fisher_options_with_gram_statistics_are_refused(tmp_path, capsys, flags, said):
    """hp29 N7: `stats gram --fisher empirical` / `--per-example vmap` were ignored without a word."""
    rc, _, err = run_cli(["stats", "gram", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                          "-o", str(tmp_path / "out"), *flags], capsys)
    assert rc != 0 and f"{said} to fisher statistics" in err, err
    assert not (tmp_path / "out").exists()


def test_a_hard_link_in_a_demo_workdir_is_never_written_through(tmp_path, capsys):
    """hp29 F4: a demo stopped while writing (its marker says so), then base/config.json made a hard link to a file
    outside the workdir: the rerun wrote the demo's config into that file."""
    import os

    from tiesmerge.paths import demo_workdir

    wd = demo_workdir(tmp_path / "wd")  # a demo began writing, and stopped
    (wd / "base").mkdir()
    victim = tmp_path / "notes.txt"
    victim.write_text("my notes")
    os.link(victim, wd / "base" / "config.json")
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(wd)], capsys)
    assert rc != 0 and "base/config.json (a hard link)" in err, err
    assert victim.read_text() == "my notes"


def _add_empty_tensor(directory, shape):
    """Rewrite ``directory``'s model.safetensors by hand with an extra F32 tensor of ``shape`` holding no bytes
    (safetensors' own writers cannot make every such shape)."""
    import json
    import struct

    from safetensors.torch import load_file

    path = directory / "model.safetensors"
    state = load_file(str(path))
    header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in state.items():
        data = tensor.contiguous().numpy().tobytes()
        code = {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype]
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    header["model.empty"] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("method", ["ties", "tsv_m", "slerp"])
def test_tensors_of_no_entries_are_copied_whatever_their_shape(tmp_path, capsys, method):
    """hp29 F5: a tensor of shape (0, 2**62) ended in "unexpected ValueError"; N9: tsv_m asked 12 TiB of workspace for
    one of shape (2**40, 0)."""
    import json
    import struct

    b, ms = write_family_dirs(tmp_path)
    for d in (b, *ms):
        _add_empty_tensor(d, (2**40, 0))
    rc, _, err = run_cli(["merge", "--method", method, "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]),
                          "-o", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["model.empty"]["shape"] == [2**40, 0]
    for d in (b, *ms):
        _add_empty_tensor(d, (0, 2**62))
    rc, _, err = run_cli(["merge", "--method", method, "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]),
                          "-o", str(tmp_path / "out2")], capsys)
    assert rc != 0 and "tensor 'model.empty' has shape (0, 4611686018427387904)" in err, err
    assert "unexpected" not in err


def test_an_adapter_update_past_the_float16_base_warns(tmp_path, capsys):
    """hp29 N8: a merged adapter (float32 factors) whose update B·A is past the float16 base's range was written
    without a word, while the full-model merge refused the overflow."""
    base = make_base(dtype=torch.float16)
    b = write_hf_dir(tmp_path / "base", base)
    factors = {m: (a * 3000, b_ * 3000) for m, (a, b_) in random_lora(base, 2, seed=1).items()}
    lora = write_lora_dir(tmp_path / "lora", factors, alpha=2)
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--lam", "1", "--base", str(b), "--model", str(lora),
                          "--output-format", "adapter", "-o", str(tmp_path / "out")], capsys)
    assert rc == 0 and "past the largest value of the base's float16" in err, err


def test_factors_with_the_adapter_name_are_named_as_a_state_dict(tmp_path, capsys):
    """hp29 N10: keys like `...q_proj.lora_A.other.weight` (a PeftModel's state_dict()) were called a LoRA variant.
    (PEFT 0.21 loads those under its default name, `.default.`, as plain factors: merged since hostile pass 32.)"""
    from safetensors.torch import load_file, save_file

    path = write_lora_dir(tmp_path / "lora", random_lora(make_base(), 2, seed=1), alpha=4)
    weights = load_file(str(path / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".other.weight"): v for k, v in weights.items()},
              str(path / "adapter_model.safetensors"))
    err = _adapter_refused(tmp_path, capsys, path)
    assert "its LoRA factors carry the adapter name 'other'" in err and "save_pretrained" in err, err


def test_a_count_past_the_models_in_a_grid_is_said(recwarn):
    """hp29 N11: tune dropped consensus' k=3 from k=1,2,3 with 2 models without a word; search scored 100 candidates
    before refusing k=3 one by one."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.registry import method_class
    from tiesmerge.tuning.space import build_space, fit_counts

    with pytest.raises(ConfigError, match="consensus: k=3 counts tasks, but only 2 models are merged"):
        build_space("consensus", 2, axes=["k"], grid={"k": [1, 3]})  # the user's own values
    with pytest.warns(Warning, match="consensus: k=3 left out of the grid: it counts tasks, and 2 models"):
        assert fit_counts(method_class("consensus"), {"k": (1, 2, 3)}, 2, given=set())["k"] == (1, 2)
    # hp30 F2: the command line hands the paper's grid over with --grid on top: the paper's k=1,2,3 is cut, not refused
    with pytest.warns(Warning, match="k=3 left out of the grid"):
        assert build_space("consensus", 2, axes=["k"], grid={"k": (1, 2, 3)}).axes[0].values == (1, 2)


def test_numbas_own_switches_are_no_bug(tmp_path, capsys, monkeypatch):
    """hp29 F6: NUMBA_DISABLE_JIT=1 ran the kernels as Python ("unexpected NotImplementedError ... bug"), and a
    NUMBA_THREADING_LAYER numba cannot load ("unexpected ValueError ... bug")."""
    import os
    import subprocess
    import sys

    b, ms = write_family_dirs(tmp_path)
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")  # the torch engine merges instead
    for method in ("ties", "slerp"):
        rc, out, err = run_cli(["merge", *flags, "--method", method, "-o", str(tmp_path / f"j-{method}")], capsys)
        assert rc == 0, err
    monkeypatch.delenv("NUMBA_DISABLE_JIT")
    for layer in ("bogus", ""):  # hp30 F3: set but empty is no layer either
        env = {**os.environ, "NUMBA_THREADING_LAYER": layer, "TIESMERGE_CACHE_DIR": str(tmp_path / "cache")}
        done = subprocess.run([sys.executable, "-m", "tiesmerge", "merge", *flags, "-o", str(tmp_path / "t")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and f"NUMBA_THREADING_LAYER={layer!r}: numba cannot load" in done.stderr, \
            done.stderr
        assert "bug" not in done.stderr and not (tmp_path / "t").exists()


def test_a_config_peft_021_refuses_is_merged_as_older_peft_did_and_said(tmp_path, capsys):
    """hp29 N12: a regex target_modules beside layers_to_transform: PEFT 0.21's LoraConfig refuses it (older PEFT
    ignored the layers); it was merged without a word."""
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4,
                          config={"target_modules": r".*\.(q_proj|up_proj)", "layers_to_transform": [0]})
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(lora),
                          "-o", str(tmp_path / "out")], capsys)
    assert rc == 0 and "layers_to_transform is set: PEFT 0.21 refuses to load such a config" in err, err


def test_a_nan_setting_is_one_problem():
    """hp29 N5: adapt --lr nan / --init inf listed "must be finite" and then "must be in (0, 10], got nan"."""
    from tiesmerge.adamerging.learn import AdaptConfig

    problems = AdaptConfig(lr=float("nan"), init=float("inf")).problems()
    assert problems == ["lr must be a finite number, got nan", "init must be a finite number, got inf"], problems


def test_base_names_resolve_as_the_plain_rule_on_random_names():
    """BaseNames (indexed, tails bounded) against the rule it implements, written plainly: the exact name, then the
    module's tails after each dot, longest first, then the one base name ending with '.' + module + suffix."""
    import random

    def plain(module, suffix, names):
        parts = module.split(".")
        for start in range(len(parts)):
            if ".".join(parts[start:]) + suffix in names:
                return ".".join(parts[start:]) + suffix
        ending = [n for n in names if n.endswith("." + module + suffix)]
        return ending[0] if len(ending) == 1 else None

    class _Named(_Base):
        def directory(self):
            return None

    r = random.Random(0)
    parts = ["a", "b", "model", "layers", "0", "1", "q", ".", "", "x.y", "lm_head"]
    for _ in range(5000):
        names = {".".join(r.choice(parts) for _ in range(r.randint(1, 5))) + r.choice([".weight", "", ".bias"])
                 for _ in range(r.randint(1, 8))}
        module, suffix = ".".join(r.choice(parts) for _ in range(r.randint(1, 6))), r.choice([".weight", ""])
        try:
            got = BaseNames(_Named(names)).resolve(module, suffix, "ad", "k")
        except IncompatibleCheckpointsError:
            got = None
        assert got == plain(module, suffix, names), (names, module, suffix)


def _tied_base(tmp_path):
    base = make_base()
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()  # tied, stored under both names
    return base, write_hf_dir(tmp_path / "base", base, config={"model_type": "llama", "tie_word_embeddings": True})


def test_a_change_to_a_tied_head_alone_is_refused(tmp_path, capsys):
    """hp30 F1: a LoRA on lm_head of a base that ties it to its embedding but stores both names: the head's update
    was written under lm_head, which transformers replaces by the embedding when it loads the output (lost)."""
    base, b = _tied_base(tmp_path)
    g = torch.Generator().manual_seed(0)
    lora = write_lora_dir(tmp_path / "lora", {"lm_head": (torch.randn(2, 8, generator=g),
                                                           torch.randn(32, 2, generator=g))}, alpha=4)
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(lora), "-o",
                          str(tmp_path / "out")], capsys)
    assert rc != 0 and "changes 'lm_head.weight' apart from 'model.embed_tokens.weight'" in err, err
    untied = dict(base)
    untied["lm_head.weight"] = base["lm_head.weight"] + 0.1  # a full fine-tune trained with an untied head
    ft = write_hf_dir(tmp_path / "ft", untied, config={"model_type": "llama", "tie_word_embeddings": True})
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(ft), "-o",
                          str(tmp_path / "out2")], capsys)
    assert rc != 0 and "tie_word_embeddings: false" in err, err
    embed_only = dict(base)
    embed_only["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 0.1  # the head follows at load
    ft = write_hf_dir(tmp_path / "ft3", embed_only, config={"model_type": "llama", "tie_word_embeddings": True})
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(ft), "-o",
                          str(tmp_path / "out3")], capsys)
    assert rc == 0, err


def test_a_plain_weight_beside_its_modules_factors_is_refused(tmp_path, capsys):
    """hp30 F4: factors for q_proj and a plain `...q_proj.weight` (no modules_to_save): PEFT drops the plain weight
    (an adapted module's own weight is `<module>.base_layer.weight`), tiesmerge merged it as the module's change."""
    base = make_base()
    module = "model.layers.0.self_attn.q_proj"
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4,
                          extra={module + ".weight": base[module + ".weight"] + 5})
    err = _adapter_refused(tmp_path, capsys, lora)
    assert f"is a whole weight of {module!r}, which the adapter's LoRA factors adapt" in err, err
    ok = write_lora_dir(tmp_path / "ok", random_lora(base, 2, seed=1), alpha=4,
                        extra={module + ".base_layer.weight": base[module + ".weight"] + 5})
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "base"), "--model",
                          str(ok), "-o", str(tmp_path / "ok-out")], capsys)
    assert rc == 0, err


def test_notes_of_the_thirtieth_pass(tmp_path, capsys):
    """hp30 N1: models of empty tensors only were said to be "integers or booleans"; N4: an (IA)³ file with a plain
    weight got merge's generic hint; N5: a mergekit `base+full_model` merged the full model as a fine-tune without a
    word; N6: --stats with ties and union blamed ties for reading statistics."""
    import warnings as pywarnings

    from safetensors.torch import load_file, save_file

    import tiesmerge
    from helpers_adapters import random_ia3, write_ia3_dir
    from tiesmerge.errors import MergeWarning

    empty = {"a.weight": torch.zeros(0, 4), "b.weight": torch.zeros(4, 0)}
    dirs = [write_hf_dir(tmp_path / n, empty) for n in ("eb", "e1", "e2")]
    with pywarnings.catch_warnings(record=True) as caught:
        pywarnings.simplefilter("always")
        tiesmerge.merge(str(dirs[0]), [str(d) for d in dirs[1:]], "ties", output=str(tmp_path / "eo"))
    said = [str(w.message) for w in caught if issubclass(w.category, MergeWarning) and "nothing to merge" in
            str(w.message)]
    assert said and "tensors of no entries (2)" in said[0], said

    base = make_base()
    ia3 = write_ia3_dir(tmp_path / "ia3", random_ia3(base, seed=1))
    weights = load_file(str(ia3 / "adapter_model.safetensors"))
    weights["base_model.model.model.norm.weight"] = base["model.norm.weight"]
    save_file(weights, str(ia3 / "adapter_model.safetensors"))
    assert "merge the adapter into its base with PEFT" in _adapter_refused(tmp_path / "n4", capsys, ia3)

    b, ms = write_family_dirs(tmp_path)
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {b}+{ms[0]}\n"
                      f"    parameters: {{weight: 1.0}}\n  - model: {ms[1]}\n    parameters: {{weight: 1.0}}\n")
    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "mk")], capsys)
    assert rc != 0 and "after '+' is no PEFT adapter" in err, err
    rc, _, err = run_cli(["merge", "--method", "ties", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]),
                          "--stats", str(tmp_path / "x"), "--stats", str(tmp_path / "y"), "--vocab-policy", "union",
                          "-o", str(tmp_path / "n6")], capsys)
    assert rc != 0 and "statistics were given, but method 'ties' does not use them" in err, err


def test_a_spec_list_of_non_json_numbers_is_checked_as_numbers():
    """hp30 N3: `task_arithmetic:weights=[inf,1]` was refused as "not a list" (JSON has no inf)."""
    from tiesmerge.api import method_of_spec
    from tiesmerge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"weights must be a finite number, got inf in \[inf, 1.0\]"):
        method_of_spec("task_arithmetic:weights=[inf,1]")
    assert method_of_spec("task_arithmetic:weights=[1,2]").weights == (1.0, 2.0)
    with pytest.raises(ConfigError, match=r"weights must be a finite number, got 'a' in \['a', '1'\]") as err:
        method_of_spec("task_arithmetic:weights=[a,1]")  # (a list of words since hp63a c35: its word is named)
    assert "quotes" not in err.value.hint  # (a text option's hint)
    with pytest.raises(ConfigError, match=r"exclude must be a regular expression \(a string\), got \('a', 'b'\)") \
            as err:  # hp63a c35: an unquoted [a,b] was the regex character class, silently
        method_of_spec("tsv_m:exclude=[a,b]")
    assert 'a text that holds commas goes in quotes, exclude="..."' in err.value.hint
    assert method_of_spec('tsv_m:exclude="[a,b]"').exclude == "[a,b]" and method_of_spec("tsv_m:exclude=[ab]").exclude \
        == "[ab]"
    with pytest.raises(ConfigError, match="'1;\\*=0.5' is no option: the comma before it") as err:  # (hp64a c171)
        method_of_spec("slerp:t_by_name=self_attn=0,1;*=0.5,layers=2")
    assert 't_by_name="self_attn=0,1;*=0.5"' in err.value.hint


@pytest.mark.parametrize("target", ["all-linear", "ALL-LINEAR"])
def test_all_linear_leaves_out_the_output_layer_and_embeddings(tmp_path, capsys, target):
    """hp30 F5: under target_modules "all-linear" PEFT adapts every Linear layer but the output layer, and no
    embedding; tiesmerge merged lm_head's (and embed_tokens') factors that PEFT never loads."""
    base = make_base()
    g = torch.Generator().manual_seed(0)
    factors = {**random_lora(base, 2, seed=1), "lm_head": (torch.randn(2, 8, generator=g),
                                                            torch.randn(32, 2, generator=g))}
    lora = write_lora_dir(tmp_path / "lora", factors, alpha=4, config={"target_modules": target})
    err = _adapter_refused(tmp_path, capsys, lora)
    assert "'lm_head' (all-linear selects the Linear layers but the output layer" in err, err
    ok = write_lora_dir(tmp_path / "ok", random_lora(base, 2, seed=1), alpha=4, config={"target_modules": target})
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "base"), "--model",
                          str(ok), "-o", str(tmp_path / "ok-out")], capsys)
    assert rc == 0, err


def test_an_empty_target_modules_list_and_an_ia3_reference(tmp_path, capsys):
    """hp30 N7: target_modules [] (PEFT 0.21 refuses the adapter: no module targeted) was merged as "every module";
    N4: --sign-from an (IA)³ adapter got merge's generic hint."""
    from helpers_adapters import random_ia3, write_ia3_dir

    base = make_base()
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4, config={"target_modules": []})
    assert "target_modules is an empty list, so PEFT adapts no module" in _adapter_refused(tmp_path, capsys, lora)
    b, ms = write_family_dirs(tmp_path / "f")
    ia3 = write_ia3_dir(tmp_path / "ia3", random_ia3(make_base(), seed=1))
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--sign-from",
                          str(ia3), "-o", str(tmp_path / "o")], capsys)
    assert rc != 0 and "an (IA)³ adapter cannot be a reference model" in err and "LoRA adapter of it" in err, err
