"""Hostile pass 84 (and the notes of earlier passes it re-tried): what a careless user's inputs still got wrong."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("argv", [["merge", "--base", "b", "--model", "m", "-o", "-"],
                                  ["tune", "--base", "b", "--model", "m", "--evaluator", "e:f", "--json", "-"]])
def test_a_dash_as_a_written_path_is_refused_not_made_a_folder(tmp_path, capsys, monkeypatch, argv):
    """81a c46: `-o -` made a folder named '-' (the usual word for standard output, which nothing writes to)."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "named '-'" in err and "standard output" in err and "./-" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def tune_family(tmp_path, monkeypatch):
    """A base and two fine-tunes as folders, the working folder tmp_path (importable: evaluator modules go there)."""
    from helpers_ckpt import make_family, write_hf_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    base, models = make_family(2, with_int=False)
    return write_hf_dir(tmp_path / "b", base), [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]


def _save_model(folder, tensors, config):
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("kind", ["mlx", "quanto", "int32 weight"])
def test_mlx_quanto_and_integer_weights_are_refused_as_quantized(tmp_path, capsys, kind):
    """hp84a c03, c04, c17: MLX checkpoints (config `quantization`, packed uint32 weights, `.scales`/`.biases`),
    optimum-quanto's (`weight._data`, `weight._scale`) and a layer's weight stored as int32 merged with exit 0: the
    scales averaged, the codes (and a LoRA's change to them) copied from the base."""
    import torch

    from helpers_ckpt import run_cli

    torch.manual_seed(0)
    codes = torch.randint(0, 2**31 - 1, (8, 1), dtype=torch.int32)
    config = {"model_type": "llama", "num_hidden_layers": 1}
    for name, noise in (("b", 0.0), ("x", 0.1), ("y", 0.2)):
        tensors = {"model.norm.weight": torch.ones(8) + noise}
        if kind == "mlx":
            tensors.update({"l.weight": codes, "l.scales": (torch.rand(8, 1) + noise).half(),
                            "l.biases": (torch.rand(8, 1) + noise).half()})
        elif kind == "quanto":
            tensors.update({"l.weight._data": codes.to(torch.int8), "l.weight._scale": torch.rand(8, 1) + noise})
        else:
            tensors["l.weight"] = codes if name == "b" else torch.randn(8, 1)
        _save_model(tmp_path / name, tensors, {**config, "quantization": {"group_size": 64, "bits": 4}}
                    if kind == "mlx" else config)
    rc, _, err = run_cli(["merge", "--method", "average", "--base", tmp_path / "b", "--model", tmp_path / "x",
                          "--model", tmp_path / "y", "-o", tmp_path / "o"], capsys)
    assert rc == 1 and "is a quantized checkpoint" in err and "dequantize" in err, err
    assert {"mlx": "declares quantization", "quanto": "'l.weight._data'",
            "int32 weight": "stores 'l.weight' as int32"}[kind] in err, err
    assert not (tmp_path / "o").exists()


def test_an_integer_tensor_a_model_changes_as_floats_is_refused_or_said(tmp_path):
    """hp84a c17: only int8/uint8 base tensors were checked against models changing them as floats: a LoRA of an
    int16/int32 one, or a fine-tune storing floats there, kept the base's values silently."""
    import warnings

    import torch

    import tiesmerge
    from helpers_adapters import write_lora_dir
    from tiesmerge.errors import IncompatibleCheckpointsError, MergeWarning
    from tiesmerge.io.align import align
    from tiesmerge.io.checkpoint import open_checkpoint

    # any width, and booleans (hp85a c17, c69: a uint8 buffer was refused as "a quantized base?", a bool one said as
    # an "integer tensor")
    for dtype in (torch.int16, torch.uint8, torch.bool):
        base = {"model.buf": torch.arange(8).to(dtype), "model.w.weight": torch.randn(8, 8)}
        model = {"model.buf": torch.randn(8), "model.w.weight": base["model.w.weight"] + 0.1}
        with pytest.warns(MergeWarning, match=r"1 integer or boolean tensor\(s\) of the base \('model.buf'\) are "
                                              r"stored as floats by model\(s\) 0: .* the output keeps the base's"):
            out = tiesmerge.merge(base, [model], "task_arithmetic")
        assert torch.equal(out["model.buf"], base["model.buf"])
    with warnings.catch_warnings():  # the same integers: nothing to say
        warnings.simplefilter("error")
        tiesmerge.merge(base, [{**model, "model.buf": base["model.buf"]}], "task_arithmetic")
    # an adapter of an integer tensor (align's own check, behind the quantized-base refusal of integer weights)
    packed = {"model.w.weight": torch.randint(0, 99, (8, 8), dtype=torch.int32), "model.v.weight": torch.randn(8, 8)}
    b = _save_model(tmp_path / "b", packed, {"model_type": "llama"})
    lora = write_lora_dir(tmp_path / "l", {"model.w": (torch.randn(2, 8), torch.randn(8, 2))}, alpha=4)
    base_ckpt, adapter = open_checkpoint(b), open_checkpoint(str(lora))
    adapter.bind(base_ckpt)
    with pytest.raises(IncompatibleCheckpointsError, match="the base stores it as int32 but model 0 changes it"):
        align(base_ckpt, [adapter])


def test_a_switch_given_true_or_false_is_taken_as_meant(tmp_path, capsys, monkeypatch):
    """hp84a c42: `tiesmerge methods` showed boolean options as (true|false); given so on the command line, the word
    was read as the recipe ("false: no such file or directory (cannot read the recipe)")."""
    from safetensors.torch import load_file

    from helpers_ckpt import make_family, run_cli, write_hf_dir

    monkeypatch.chdir(tmp_path)
    base, models = make_family(2, with_int=False)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [str(write_hf_dir(tmp_path / f"m{k}", m)) for k, m in enumerate(models)]
    common = ["merge", "--method", "task_arithmetic", "--base", b, "--model", ms[0], "--model", ms[1],
              "--weights", "1", "3"]
    outputs = {}
    for given in (["--normalize-weights"], ["--normalize-weights", "true"], ["--normalize-weights=yes"],
                  ["--no-normalize-weights"], ["--normalize-weights", "false"], ["--normalize-weights=0"]):
        out = tmp_path / f"o{len(outputs)}"
        rc, _, err = run_cli([*common, *given, "-o", out], capsys)
        assert rc == 0, (given, err)
        outputs[" ".join(given)] = load_file(str(out / "model.safetensors"))
    on, off = outputs["--normalize-weights"], outputs["--no-normalize-weights"]
    name = next(n for n in on if not (on[n] == off[n]).all())
    for given, state in outputs.items():
        expected = on if any(w in given for w in ("true", "yes")) or given == "--normalize-weights" else off
        assert (state[name] == expected[name]).all(), given
    rc, out, _ = run_cli(["methods", "task_arithmetic"], capsys)
    assert "a switch: --normalize-weights or --no-normalize-weights; true|false in a recipe" in out


def test_gguf_is_said_not_read_wherever_it_is_given(tmp_path, capsys):
    """hp84a c59: a .gguf recipe was told to be given as --base/--model, where it then failed as "not a .safetensors
    file" (the file) or "give the directory that holds the weights" (its folder, which did)."""
    import torch

    from helpers_ckpt import run_cli

    base = _save_model(tmp_path / "b", {"w": torch.randn(4, 4)}, {"model_type": "x"})
    other = _save_model(tmp_path / "m", {"w": torch.randn(4, 4)}, {"model_type": "x"})
    (tmp_path / "gg").mkdir()
    (tmp_path / "gg" / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 16)
    (tmp_path / "gg" / "config.json").write_text('{"model_type": "x"}')
    for argv, rc_wanted, said in (
            (["merge", tmp_path / "gg" / "model.gguf"], 2, "a GGUF weights file, not a recipe"),
            (["merge", "--base", base, "--model", tmp_path / "gg" / "model.gguf", "--model", other], 1,
             "is a GGUF file, which tiesmerge does not read"),
            (["merge", "--base", base, "--model", tmp_path / "gg", "--model", other], 1,
             "its weights are GGUF (model.gguf), which tiesmerge does not read")):
        rc, _, err = run_cli([*argv, "-o", tmp_path / "o"], capsys)
        assert rc == rc_wanted and said in err and "convert_hf_to_gguf" in err, err
        assert "--base or --model" not in err and not (tmp_path / "o").exists()


def test_negative_weights_under_sign_from_are_said_to_oppose_the_reference(tmp_path):
    """hp84a c32: with sign_from, weights -1, -1 were said to change nothing (the elected mean's division undoes their
    sign), but the reference's sign is not elected: the merge kept the entries that oppose it."""
    import warnings

    import torch

    import tiesmerge
    from tiesmerge.errors import MergeWarning

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 16, generator=g)}
    models = [{"w": base["w"] + 0.1 * torch.randn(16, 16, generator=g)} for _ in range(2)]
    ref = {"w": base["w"] + 0.1 * torch.randn(16, 16, generator=g)}
    reference = _save_model(tmp_path / "ref", ref, {"model_type": "x"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        neg = tiesmerge.merge(base, models, "ties", sign_from=reference, weights=[-1, -1], density=1.0)["w"] - base["w"]
    said = [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]
    assert any("with sign_from" in m and "oppose the reference" in m for m in said), said
    assert not any("do not negate" in m for m in said), said
    assert ((neg.sign() != (ref["w"] - base["w"]).sign()) & (neg != 0)).any()  # what the warning says, it does


@pytest.mark.parametrize("where", ["here", "sub"])
def test_validate_names_a_missing_base_once_and_every_missing_model(tmp_path, capsys, monkeypatch, where):
    """hp84a c29: from the recipe's parent folder the missing base was listed twice (in two wordings) and the missing
    models never named (exit 2), though the hint said each model was checked; from the recipe's folder the base was
    "(cannot read the model)" (exit 1)."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rr").mkdir()
    recipe = tmp_path / "rr" / "r.yaml" if where == "sub" else tmp_path / "r.yaml"
    recipe.write_text("method: ties\nbase: nothere\nmodels: [missing1, missing2]\n")
    rc, _, err = run_cli(["validate", str(recipe.relative_to(tmp_path))], capsys)
    assert rc == 1 and "3 problems with the inputs" in err, err
    listed = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(listed) == 3 and sum("nothere" in line for line in listed) == 1, err
    assert "missing1" in listed[1] and "missing2" in listed[2], err
    if where == "here":
        assert "nothere: no such file or directory (cannot read the base)" in err, err
    else:
        assert "was only opened, not checked against it" in err and "checked against the base on its own" not in err


def test_a_user_evaluators_tiesmerge_error_is_said_as_the_evaluators(tmp_path, capsys, tune_family):
    """hp84b c07: an evaluator raising one of tiesmerge's errors was printed bare ("error: evaluator said no"), with
    the command's --help as the hint; c11: a model replaced during tune was hinted to "run the search again in a new
    --dir", which tune has not."""
    import sys

    from helpers_ckpt import run_cli

    b, ms = tune_family
    (tmp_path / "ev84.py").write_text(
        "calls = []\n"
        "def no(sd):\n    from tiesmerge.errors import TiesMergeError\n    raise TiesMergeError('evaluator said no')\n"
        "def touch(sd):\n    calls.append(1)\n"
        f"    open({str(ms[1] / 'model.safetensors')!r}, 'ab').write(b'x')\n    return 0.5\n")
    common = ["tune", "--base", b, "--model", ms[0], "--model", ms[1], "--grid", "density=0.2", "--grid", "lam=1,2"]
    rc, _, err = run_cli([*common, "--evaluator", "ev84:no"], capsys)
    assert rc == 1 and "--evaluator ev84:no: raised TiesMergeError: evaluator said no" in err, err
    assert "--help" not in err and "fix the evaluator" in err, err
    rc, _, err = run_cli([*common, "--evaluator", "ev84:touch"], capsys)
    assert rc == 1 and "model 1 changed while tune ran" in err and "run tune again" in err, err
    assert "--dir" not in err, err
    sys.modules.pop("ev84", None)


@pytest.mark.parametrize("how", ["run_search", "tune"])
def test_an_api_grid_past_the_sweeps_limit_is_refused_before_it_is_built(how):
    """hp84b c25: run_search's grid of 10^5 x 10^5 values was built whole before the budget cut it (memory until
    killed, or a bare MemoryError), and tune took any grid, where the command line refuses past 100,000 points."""
    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search, tune

    base = {"w": torch.zeros(4)}
    models = [{"w": torch.randn(4)} for _ in range(2)]
    n = 100_000
    grid = {"lam": [1.0 + i / n for i in range(n)], "density": [(i + 1) / (n + 1) for i in range(n)]}
    with pytest.raises(ConfigError, match=r"the grid has 10,000,000,000 points .* more than the 100,000"):
        if how == "tune":
            tune(base, models, "ties", lambda sd: 0.5, grid=grid)
        else:
            run_search(base, models, "ties", lambda sd: 0.5, strategy="grid", grid=grid, budget=1)


def test_a_negative_fisher_value_is_not_blamed_on_an_older_overflow():
    """hp84b c42: negative Fisher values were hinted as "damaged, or an older tiesmerge wrote statistics that
    overflow", though overflow makes NaN or Inf, never a negative value."""
    import torch

    from helpers_ckpt import make_family
    from helpers_merge import fisher_stats, float_names, merge
    from tiesmerge.errors import InvalidTensorError
    from tiesmerge.methods.fisher import Fisher

    base, models = make_family(2)
    names = float_names(base)
    stats = [fisher_stats({n: torch.ones(base[n].shape) for n in names}) for _ in range(2)]
    stats[1].tensors[names[0]][(0,) * base[names[0]].dim()] = -1.0
    with pytest.raises(InvalidTensorError, match="holds negative values") as caught:
        merge(base, models, Fisher(), stats)
    assert "older tiesmerge" not in caught.value.hint and "recompute" in caught.value.hint


def test_one_merge_is_said_in_the_singular(tmp_path, capsys, tune_family):
    """hp84b c57: "2 scored and 1 merges in this run"; hp86b c23n: "(1 candidates, ...)"."""
    import sys

    from helpers_ckpt import run_cli

    b, ms = tune_family
    (tmp_path / "ev84s.py").write_text("def score(sd):\n    return 0.5\n")
    rc, out, err = run_cli(["search", "--base", b, "--model", ms[0], "--model", ms[1], "--evaluator", "ev84s:score",
                            "--strategy", "random", "--budget", "2", "--axis", "lam", "--dir", tmp_path / "s"], capsys)
    sys.modules.pop("ev84s", None)
    assert rc == 0 and "2 scored and 1 merge in this run" in out, (out, err)
    assert "and 1 merge in this run" in (tmp_path / "s" / "results.md").read_text()
    rc, out, err = run_cli(["search", "--base", b, "--model", ms[0], "--model", ms[1], "--evaluator", "ev84s:score",
                            "--strategy", "random", "--budget", "1", "--axis", "lam", "--dir", tmp_path / "s1"], capsys)
    sys.modules.pop("ev84s", None)
    assert rc == 0 and "(1 candidate, 1 scored and 1 merge in this run" in out, (out, err)


def test_run_search_checks_its_fixed_options_before_the_first_candidate():
    """hp84b c27: fixed={"zzz": 2.0} was said per candidate, after merges, with a hint to narrow the ranges and a
    log that did not exist; the command line's --set said it up front."""
    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, calls = {"w": torch.zeros(4)}, []
    models = [{"w": torch.randn(4)} for _ in range(2)]
    for fixed, said in (({"zzz": 2.0}, "fixed['zzz']: ties has no option 'zzz' (it has: density, lam"),
                        ({"density": 5.0}, "fixed['density']: density must be a fraction in (0, 1]")):
        with pytest.raises(ConfigError, match=re.escape(said)) as caught:
            run_search(base, models, "ties", lambda sd: calls.append(1) or 0.5, strategy="random", budget=2,
                       axes=("lam",), fixed=fixed)
        assert "--range" not in str(caught.value) and "log" not in str(caught.value)
    assert calls == []


@pytest.mark.parametrize("method", ["ties", "average"])
def test_searching_one_models_weight_that_divides_out_is_refused(method):
    """hp84b c29: search --axis weights with one model merged and scored every candidate alike (its weight divides
    out of the weighted mean); task_arithmetic's unnormalised weight still scales the task vector, and is searched."""
    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = {"w": torch.zeros(4)}, [{"w": torch.randn(4)}]
    with pytest.raises(ConfigError, match="searching weights changes nothing: with one model, its weight divides out"):
        run_search(base, models, method, lambda sd: 0.5, strategy="random", budget=2, axes=("weights",))
    scores = []
    run_search(base, models, "task_arithmetic", lambda sd: scores.append(float(sd["w"].sum())) or 0.5,
               strategy="random", budget=2, axes=("weights",))
    assert len(set(scores)) == 2


def test_a_second_search_on_a_log_is_refused_before_the_firsts_first_score(tmp_path):
    """hp84b c54: the first search made its --dir and took the log's lock only with its first score: a second search
    on the same --dir started meanwhile ran, and the first then lost its first evaluation ("the log of another
    search"). A search that stops before scoring still leaves no log behind."""
    import torch

    from tiesmerge.errors import EvaluatorError, OutputError
    from tiesmerge.tuning import run_search

    base = {"w": torch.zeros(4)}
    models = [{"w": torch.randn(4)} for _ in range(2)]
    log = tmp_path / "dir" / "sub" / "log.jsonl"
    refused = []

    def first(state):
        if not refused:
            with pytest.raises(OutputError, match="another search is writing this log now") as caught:
                run_search(base, models, "ties", lambda sd: 0.1, strategy="random", budget=1, axes=["lam"],
                           log=str(log))
            refused.append(caught.value)
        return 0.5

    result = run_search(base, models, "ties", first, strategy="random", budget=2, axes=["lam"], log=str(log))
    assert refused and len(result.trials) == 2 and len(log.read_text().splitlines()) == 3

    def fails(state):
        raise RuntimeError("no")

    other = tmp_path / "other" / "log.jsonl"
    with pytest.raises(EvaluatorError):
        run_search(base, models, "ties", fails, strategy="random", budget=2, axes=["lam"], log=str(other))
    assert not (tmp_path / "other").exists()
    (tmp_path / "empty.jsonl").write_text("")  # an empty file of the user's is no log this search made: it stays
    with pytest.raises(EvaluatorError):
        run_search(base, models, "ties", fails, strategy="random", budget=2, axes=["lam"],
                   log=str(tmp_path / "empty.jsonl"))
    assert (tmp_path / "empty.jsonl").exists()


def test_pass_84_merge_side_notes(tmp_path, capsys):
    """hp84a notes: c19 an empty weight_map beside whole shards was blamed on the architecture; c28 a key twice in
    one flow mapping was "lines 4 and 4"; c36 shard_size and force without output= were ignored; c38 a reference of
    another dtype omitted the base's; c51 thirteen models weighted 1 and -1 were "without bound" (the bound is 3);
    c52 base_model in a tiesmerge recipe hinted 'models'; c58 a recipe's device: was hinted with --device."""
    import json
    import warnings

    import torch

    import tiesmerge
    from helpers_ckpt import run_cli
    from tiesmerge.errors import CheckpointError, ConfigError, IncompatibleCheckpointsError

    b = torch.randn(8, 8)
    base = _save_model(tmp_path / "b", {"w": b, "v": b + 1}, {"model_type": "x"})
    model = _save_model(tmp_path / "m", {"w": b + 0.1, "v": b + 1.1}, {"model_type": "x"})
    sharded = _save_model(tmp_path / "s", {"w": b + 0.2}, {"model_type": "x"})
    (tmp_path / "s" / "model.safetensors").rename(tmp_path / "s" / "model-00001-of-00002.safetensors")
    _save_model(tmp_path / "s2", {"v": b + 1.2}, {})
    (tmp_path / "s2" / "model.safetensors").rename(tmp_path / "s" / "model-00002-of-00002.safetensors")
    (tmp_path / "s" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(CheckpointError, match="weight_map is empty, so it names no tensor, though the folder holds 2 "
                                              "weights file") as caught:
        tiesmerge.merge(base, [sharded, model], "ties")
    assert "fetch it again" in caught.value.hint

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{model}]\nparameters: {{density: 0.3, density: 0.4}}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and "(line 4, columns 14 and 28)" in err, err
    recipe.write_text(f"method: ties\nbase_model: {base}\nmodels: [{model}]\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and "base_model is mergekit's key: a tiesmerge recipe writes base:" in err, err
    assert "did you mean 'models'" not in err
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{model}]\ndevice: 'cpu:0'\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "the CPU takes no index" in err and "--device" not in err, err

    for options in ({"shard_size": "1KB"}, {"force": True}):
        with pytest.raises(ConfigError, match=f"{next(iter(options))} applies to a written output"):
            tiesmerge.merge(base, [model], "ties", **options)

    _save_model(tmp_path / "ref", {"w": torch.randint(-9, 9, (8, 8), dtype=torch.int8), "v": b}, {"model_type": "x"})
    with pytest.raises(IncompatibleCheckpointsError, match=r"of the reference is \(8, 8\) int8, but the base's is "
                                                          r"\(8, 8\) float32: a reference's tensors must be floating"):
        tiesmerge.merge(base, [model], "ties", sign_from=str(tmp_path / "ref"))

    zero = {"w": torch.zeros(16)}
    many = [{"w": torch.randn(16, generator=torch.Generator().manual_seed(k))} for k in range(13)]
    with warnings.catch_warnings(record=True) as caught:  # twelve 1s and a -1 reach 3 at most, as with 12 models
        warnings.simplefilter("always")
        tiesmerge.merge(zero, many, "ties", weights=[1.0] * 12 + [-1.0], density=1.0)
    assert not [w for w in caught if "opposite signs" in str(w.message)]
    # hp85a c23: the -1 itself is undone where model 12's entry is elected alone: said
    assert [w for w in caught if "model(s) 12 have a negative weight" in str(w.message) and "added, not subtracted"
            in str(w.message)]


def test_pass_85_merge_side(tmp_path, capsys, monkeypatch):
    """hp85a c08: `--normalize-w false` (a prefix argparse takes) and `--no-normalize-weights false` sent "false" to
    the recipe; c12: a quantized sign_from reference (FP8 codes, or a config declaring it) gave the elected signs
    from its codes; c23: ties with weights 1, -0.5 kept model 1's own task vector where it was elected alone,
    without a word."""
    import warnings

    import torch

    import tiesmerge
    from helpers_ckpt import make_family, run_cli, write_hf_dir
    from tiesmerge.errors import CheckpointError

    monkeypatch.chdir(tmp_path)
    base, models = make_family(2, with_int=False)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [str(write_hf_dir(tmp_path / f"m{k}", m)) for k, m in enumerate(models)]
    common = ["merge", "--method", "task_arithmetic", "--base", b, "--model", ms[0], "--model", ms[1], "--dry-run",
              "-o", tmp_path / "o"]
    for given in (["--normalize-w", "false"], ["--normalize-w=yes"]):
        rc, out, err = run_cli([*common, *given], capsys)
        assert rc == 0 and f"normalize_weights={'yes' in given[0]}" in out, (given, out, err)
    rc, _, err = run_cli([*common, "--no-normalize-weights", "false"], capsys)
    assert rc == 2 and "the negative form of a switch takes no value" in err and "recipe" not in err, err

    name = next(n for n in base if n.endswith("proj.weight"))
    fp8 = {**models[0], name: (models[0][name] * 100).to(torch.float8_e4m3fn),
           name.removesuffix("weight") + "weight_scale": torch.tensor([0.01])}
    for label, tensors, config in (("fp8", fp8, None),
                                   ("qcfg", models[0], {"quantization_config": {"quant_method": "bitsandbytes"}})):
        ref = write_hf_dir(tmp_path / label, tensors, config=config)
        with pytest.raises(CheckpointError, match=r"\(reference\): the reference model is a quantized checkpoint"):
            tiesmerge.merge(str(b), ms, "ties", sign_from=str(ref), output=str(tmp_path / f"out-{label}"))
        assert not (tmp_path / f"out-{label}").exists()
    zero, one = {"w": torch.zeros(4)}, {"w": torch.tensor([1.0, 0.0, 2.0, 0.0])}
    two = {"w": torch.tensor([0.0, 1.0, 1.0, -3.0])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tiesmerge.merge(zero, [one, two], "ties", density=1.0, weights=[1.0, -0.5])["w"]
    assert out[1] == 1.0  # model 1 alone there: its own +1, added
    assert any("model(s) 1 have a negative weight" in str(w.message) for w in caught)
    # hp86a c08: with sign_from, weights 1, -0.999 can still cancel in the divisor: measured, not "can also cancel";
    # hp86a c11: thirteen distinct weights 1..12, -5 are measured (bound 11: no scale warning), not "without bound"
    reference = write_hf_dir(tmp_path / "ref", models[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiesmerge.merge(base, models, "ties", sign_from=str(reference), weights=[1.0, -0.999], density=1.0)
    said = [str(w.message) for w in caught]
    assert any("with sign_from" in m for m in said) and any("up to 1999 times" in m for m in said), said
    many = [{"w": torch.randn(4, generator=torch.Generator().manual_seed(k))} for k in range(13)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiesmerge.merge({"w": torch.zeros(4)}, many, "ties", weights=[float(k) for k in range(1, 13)] + [-5.0],
                        density=1.0)
    assert not [w for w in caught if "opposite signs" in str(w.message)]


@pytest.mark.parametrize("grid", [{"lam": range(10**20)}, {"density": range(10**8)}])
def test_a_huge_range_as_a_grid_axis_is_refused_at_once(grid):
    """hp85b c15: check_grid looked at every value before the grid's size: range(10**20) never returned, range(10**8)
    took 65 s to be refused."""
    import time

    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import tune

    started = time.perf_counter()
    with pytest.raises(ConfigError, match="more than the 100,000 a sweep may hold"):
        tune({"w": torch.zeros(4)}, [{"w": torch.randn(4)}, {"w": torch.randn(4)}], "ties", lambda sd: 1.0, grid=grid)
    assert time.perf_counter() - started < 5


def test_a_refused_demo_leaves_the_marker_guarding_the_users_edits(tmp_path, capsys, monkeypatch):
    """hp85b c36: a demo refused before writing (a note of the user's in merged-ties/) left its marker "writing", and
    the next demo then overwrote base/config.json the user had edited since, without a word."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "w"
    demo = ["demo", "--synthetic", "--params", "0.05", "--workdir", work]
    rc, _, err = run_cli(demo, capsys)
    assert rc == 0, err
    (work / "merged-ties" / "notes.txt").write_text("mine")
    rc, _, err = run_cli(demo, capsys)
    assert rc == 1 and "notes.txt" in err, err
    (work / "merged-ties" / "notes.txt").unlink()
    with open(work / "base" / "config.json", "a") as f:
        f.write("\n")
    edited = (work / "base" / "config.json").read_text()
    rc, _, err = run_cli(demo, capsys)
    assert rc != 0 and "changed since (base/config.json)" in err, err
    assert (work / "base" / "config.json").read_text() == edited


def test_evaluator_names_and_hints_are_said_once_and_as_given(tmp_path, capsys, tune_family):
    """hp84b c08 (hp85b c45): `--evaluator mod:x` with x = 5 was "the evaluator 5 is not callable" (exit 1, the value
    named, a Python hint); hp85b c05, c06: a user evaluator's tiesmerge error showed its hint twice (once as a
    literal \\nhint: in the error line), and a nested merge's hint read as one about the command's --base."""
    import sys

    from helpers_ckpt import run_cli

    b, ms = tune_family
    (tmp_path / "ev85.py").write_text(
        "x = 5\n"
        "def nested(sd):\n    import tiesmerge\n    tiesmerge.merge('nowhere', ['x'], 'ties')\n")
    common = ["tune", "--base", b, "--model", ms[0], "--model", ms[1], "--grid", "density=0.2", "--grid", "lam=1"]
    rc, _, err = run_cli([*common, "--evaluator", "ev85:x"], capsys)
    assert rc == 2 and "--evaluator 'ev85:x': ev85.x is int, not a function" in err, err
    rc, _, err = run_cli([*common, "--evaluator", "ev85:nested"], capsys)
    sys.modules.pop("ev85", None)
    assert rc == 1 and "raised CheckpointError: nowhere: no such file" in err, err
    assert "\\nhint" not in err and err.count("\nhint:") == 1 and "hint: the evaluator's own hint: " in err, err


def test_pass_86_merge_side(tmp_path, capsys, monkeypatch):
    """hp86a c05: `--dry-run no`, `--force false` sent the word to the recipe ("false: no such file"), and
    `--dry-run=false` was argparse's "ignored explicit argument"; c39: a FIFO given as --stats was hinted "pass a model
    directory or a .safetensors file", which --stats then refused."""
    import os

    from helpers_ckpt import make_family, run_cli, write_hf_dir

    monkeypatch.chdir(tmp_path)
    base, models = make_family(2, with_int=False)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [str(write_hf_dir(tmp_path / f"m{k}", m)) for k, m in enumerate(models)]
    common = ["merge", "--base", b, "--model", ms[0], "--model", ms[1]]
    rc, out, err = run_cli([*common, "-o", tmp_path / "o1", "--dry-run", "yes"], capsys)
    assert rc == 0 and not (tmp_path / "o1").exists() and "method" in out, err
    rc, out, err = run_cli([*common, "-o", tmp_path / "o2", "--dry-run=false", "--force", "no"], capsys)
    assert rc == 0 and (tmp_path / "o2" / "tiesmerge.json").is_file(), err
    os.mkfifo(tmp_path / "st")
    rc, _, err = run_cli([*common, "--method", "fisher", "--stats", tmp_path / "st", "--stats", tmp_path / "st2",
                          "-o", tmp_path / "o3"], capsys)
    assert rc == 1 and "the statistics folder is a FIFO" in err and "tiesmerge stats fisher|gram -o DIR" in err, err
    assert ".safetensors file" not in err
