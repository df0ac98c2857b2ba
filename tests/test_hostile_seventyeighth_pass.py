"""Hostile pass 86's notes and pass 87: what a careless user's inputs still got wrong."""

from __future__ import annotations

import json

import pytest


def _save_model(folder, tensors, config=None):
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return str(folder)


def _folder_family(tmp_path, monkeypatch, seed):
    """A base b and models m0, m1 as folders in tmp_path, the working folder (importable: evaluators go there)."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = torch.Generator().manual_seed(seed)
    _save_model(tmp_path / "b", {"w.weight": torch.randn(8, generator=g)})
    for k in range(2):
        _save_model(tmp_path / f"m{k}", {"w.weight": torch.randn(8, generator=g)})


def test_integer_layer_weights_are_called_quantized_in_a_reference(tmp_path):
    """hp86a c25: a sign_from reference whose layer weights are int8 codes was told "must be fine-tuned from the same
    base as the models"; the base's own int8 weights are refused as quantized, so the reference's are too (a
    fine-tune's are named by align: the file, the tensor and both dtypes)."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError, IncompatibleCheckpointsError

    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 8, generator=g), "n.bias": torch.randn(8, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    b = _save_model(tmp_path / "b", base)
    ms = [_save_model(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    codes = {"a.weight": (models[0]["a.weight"] * 20).round().to(torch.int8), "n.bias": models[0]["n.bias"]}
    ref = _save_model(tmp_path / "ref", codes)
    with pytest.raises(CheckpointError, match=r"the reference model is a quantized checkpoint \(it stores 'a.weight' "
                                              r"as int8") as caught:
        tiesmerge.merge(b, ms, "ties", sign_from=ref, output=str(tmp_path / "o"))
    assert "dequantize" in caught.value.hint and "same base" not in caught.value.hint
    with pytest.raises(IncompatibleCheckpointsError, match=r"'a.weight' must merge but model 1 \(.*ref.*\) stores it "
                                                          "as int8"):
        tiesmerge.merge(b, [ms[0], ref], "ties", output=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, tensor", [("attn.bitmask", "bool"), ("mem.compressed", "float"),
                                          ("norm.absmax", "float"), ("enc.quant_map", "float"),
                                          ("enc.row_offsets", "float"), ("pos.g_idx", "bool")])
def test_a_float_model_is_not_quantized_for_a_tensor_name_alone(name, tensor):
    """hp86a c26: a plain float model holding a buffer named like bitsandbytes' or compressed-tensors' state ('norm.
    absmax', a bool 'attn.bitmask') was refused as a quantized checkpoint, hinted to dequantize it."""
    import torch

    import tiesmerge

    g = torch.Generator().manual_seed(1)
    extra = torch.ones(4, dtype=torch.bool) if tensor == "bool" else torch.randn(4, generator=g)
    base = {"w.weight": torch.randn(8, generator=g), name: extra}
    models = [{"w.weight": base["w.weight"] + k + 1, name: extra.clone()} for k in range(2)]
    merged = tiesmerge.merge(base, models, "ties", density=1.0)
    assert torch.allclose(merged["w.weight"], base["w.weight"] + 1.5)


@pytest.mark.parametrize("layout", ["bnb4", "bitmask", "gptq"])
def test_the_same_names_beside_integer_codes_are_still_quantized(layout):
    """The guard of hp86a c26 keeps the real layouts refused: bitsandbytes' 4-bit state (float absmax and quant_map
    beside a uint8 weight), compressed-tensors' sparse bitmask (uint8 bitmask, integer row offsets), GPTQ's g_idx."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError

    base = {"n.weight": torch.ones(4)}
    if layout == "bnb4":
        base.update({"l.weight": torch.zeros(8, 1, dtype=torch.uint8), "l.weight.absmax": torch.ones(2),
                     "l.weight.quant_map": torch.ones(16)})
    elif layout == "bitmask":
        base.update({"l.compressed": torch.ones(5), "l.bitmask": torch.zeros(4, 1, dtype=torch.uint8),
                     "l.row_offsets": torch.zeros(4, dtype=torch.int64)})
    else:
        base.update({"l.g_idx": torch.zeros(8, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match="the base is a quantized checkpoint"):
        tiesmerge.merge(base, [{k: v.clone() for k, v in base.items()}], "ties")


def test_a_missing_name_in_an_evaluator_module_that_imports_is_said_so(tmp_path, capsys, monkeypatch):
    """hp86b c09: `--evaluator ev:good.x` (ev imports; good has no x) was hinted "the module must be importable from
    here (run from its folder, or add that folder to PYTHONPATH)"."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "ev_c09.py").write_text("def good(state):\n    return 1.0\n\n\ndef other(state):\n    return 0.0\n")
    for spec in ("ev_c09:good.x", "ev_c09:nope"):
        rc, _, err = run_cli(["tune", "--base", "b", "--model", "m", "--evaluator", spec], capsys)
        assert rc == 2 and "the module 'ev_c09' imports" in err and "PYTHONPATH" not in err, err
        assert "hint: its own functions and classes: good, other; pass --evaluator ev_c09:FUNCTION" in err, err


@pytest.mark.parametrize("method, options, pointer", [
    ("ties", {"normalize": True}, "mergekit's normalize true is aggregate mean here"),
    ("task_arithmetic", {"normalize": True}, "mergekit's normalize is normalize_weights here"),
    ("ties", {"int8_mask": True}, "mergekit's int8_mask only saves its memory"),
    ("dare_ties", {"weight": 0.5}, "mergekit's per-model weight is weights here"),
    ("della", {"lambda": 1.0}, "mergekit's lambda is lam here"),
])
def test_mergekit_words_in_a_tiesmerge_recipe_point_to_ours(tmp_path, capsys, method, options, pointer):
    """hp86a c38: `normalize: true` (mergekit's) under a tiesmerge ties recipe said only "unknown option"."""
    from helpers_ckpt import run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: {method}\nbase: b\nmodels: [x, y]\nparameters: {json.dumps(options)}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and f"unknown option '{next(iter(options))}' ({pointer}" in err, err


def test_a_search_whose_held_weights_are_all_zero_is_refused_up_front(tmp_path):
    """hp86b c24: `search --set weights=0,0 --axis lam` warned, then scored the whole budget on the base, and reported
    a "best lam" that meant nothing."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space

    for method in ("ties", "task_arithmetic", "dare_linear"):
        with pytest.raises(ConfigError, match=r"searching lam changes nothing: the held weights are all 0 \(the "
                                              r"merge is the base itself\)"):
            build_space(method, 2, axes=("lam",), fixed={"weights": (0.0, 0)})
    assert [a.name for a in build_space("ties", 2, axes=("lam",), fixed={"weights": (0.0, 1.0)}).axes] == ["lam"]


def test_python_callers_are_told_the_parameter_beside_the_flag(tmp_path):
    """hp86b c25n: run_search(budget=2.5) and popsize='3' were said as "--budget 2.5" / "--popsize '3'" only."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space
    from tiesmerge.tuning.strategies import make_strategy

    space = build_space("ties", 2, axes=("lam",))
    with pytest.raises(ConfigError) as caught:
        make_strategy("random", space, budget=2.5)
    assert "budget=40 from Python" in caught.value.hint
    for popsize in ("3", 1):
        with pytest.raises(ConfigError) as caught:
            make_strategy("cmaes", space, budget=8, popsize=popsize)
        assert "popsize=N from Python" in caught.value.hint


def test_an_evaluators_exception_without_a_message_is_said_so(tmp_path):
    """hp86b c05n: an evaluator raising a bare MemoryError() read "raised MemoryError: " and nothing after it."""
    import torch

    import tiesmerge
    from tiesmerge.errors import EvaluatorError

    def evaluate(state):
        raise MemoryError()

    g = torch.Generator().manual_seed(2)
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.randn(4, generator=g)} for _ in range(2)]
    with pytest.raises(EvaluatorError, match=r"raised MemoryError: \(no message\)"):
        tiesmerge.tune(base, models, "ties", evaluate, grid={"lam": [1.0], "density": [0.5]})


def test_a_workspace_is_not_said_to_be_for_svds_of_a_method_without_them(tmp_path):
    """hp85a c51: DELLA's budget refusal said its workspace was "e.g. for its SVDs"; DELLA ranks magnitudes."""
    import torch

    import tiesmerge
    from tiesmerge.errors import ConfigError

    base = {"a.weight": torch.zeros(8, 8)}
    models = [{"a.weight": torch.randn(8, 8, generator=torch.Generator().manual_seed(k))} for k in range(2)]
    with pytest.raises(ConfigError, match="of workspace the method needs beside it") as caught:
        tiesmerge.merge(base, models, "della", memory_budget=1)
    assert "SVD" not in str(caught.value)


def test_an_index_naming_a_tensor_twice_is_said_so(tmp_path):
    """hp85a c54: an index whose weight_map names 'a.weight' twice (JSON keeps the last) was blamed on an incomplete
    download ("fetch the shards again")."""
    import torch
    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.errors import CheckpointError

    sharded = tmp_path / "sh"
    sharded.mkdir()
    save_file({"a.weight": torch.ones(2)}, str(sharded / "s1.safetensors"))
    save_file({"b.weight": torch.ones(2)}, str(sharded / "s2.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a.weight": "s1.safetensors", "a.weight": "s2.safetensors", "b.weight": "s2.safetensors"}}')
    with pytest.raises(CheckpointError, match="gives the key 'a.weight' twice") as caught:
        tiesmerge.merge({"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}, [str(sharded)], "task_arithmetic")
    assert "fetch" not in caught.value.hint


@pytest.mark.parametrize("magic, said", [(b"GGUF\x03\x00\x00\x00" + bytes(8), "but GGUF (llama.cpp's format), by its"),
                                         (b"PK\x03\x04" + bytes(12), "but a PyTorch checkpoint (torch.save's zip")])
def test_another_format_under_a_safetensors_name_is_named(tmp_path, capsys, magic, said):
    """hp85a c75: GGUF bytes in a model.safetensors (a rename mistake) were "truncated or corrupt; download or copy it
    again"."""
    import torch

    from helpers_ckpt import run_cli

    base = _save_model(tmp_path / "b", {"a.weight": torch.zeros(4)})
    other = _save_model(tmp_path / "m", {"a.weight": torch.ones(4)})
    model = tmp_path / "g"
    model.mkdir()
    (model / "model.safetensors").write_bytes(magic)
    rc, _, err = run_cli(["merge", "--base", base, "--model", model, "--model", other, "-o", tmp_path / "o"], capsys)
    assert rc == 1 and "model.safetensors: not a safetensors file" in err and said in err, err
    assert "truncated" not in err and not (tmp_path / "o").exists()


def test_one_stats_for_two_models_is_told_per_flag(tmp_path, capsys):
    """hp85b c32: one --stats for two models read "'stats' lists 1 directories for 2 models", hinted about sizes."""
    from helpers_ckpt import run_cli

    rc, _, err = run_cli(["merge", "--method", "fisher", "--base", "b", "--model", "x", "--model", "y", "--stats", "s",
                          "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "--stats is given 1 statistics directory for 2 models: give one --stats per --model" in err, err
    assert "directories for" not in err


def test_a_weights_file_given_as_data_is_said_to_be_one(tmp_path):
    """hp85b c28: a model.safetensors given as --data was "not UTF-8 text", hinted to convert it from Latin-1."""
    import torch
    from safetensors.torch import save_file

    from tiesmerge.errors import ConfigError
    from tiesmerge.limits import read_json_lines

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.full((64,), 0.5)}, str(weights))
    with pytest.raises(ConfigError, match="the data file is not text: it is a safetensors weights file") as caught:
        read_json_lines(weights, "the data file", max_bytes=2**20, error=ConfigError)
    assert caught.value.hint == "check the path: a text file (UTF-8) is read here, not a binary one"


def test_a_resume_refused_for_another_set_names_the_option(tmp_path):
    """hp85b c14: a resume with another --set was refused as differing in "the search space (--axis, --grid, --range,
    --set, the method's options)"; c61: a changed sign_from reference was said as "the models' files"."""
    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(8)}
    models = [{"w": torch.randn(8, generator=g)} for _ in range(2)]
    log = str(tmp_path / "log.jsonl")
    run_search(base, models, "ties", lambda state: 1.0, strategy="random", budget=1, axes=("lam",), log=log)
    with pytest.raises(ConfigError, match=r"differs in: --set scope: not set there, 'global' now\)"):
        run_search(base, models, "ties", lambda state: 1.0, strategy="random", budget=2, axes=("lam",),
                   fixed={"scope": "global"}, log=log)
    with pytest.raises(ConfigError, match=r"differs in: the axes lam there, lam, density now\)"):
        run_search(base, models, "ties", lambda state: 1.0, strategy="random", budget=2, axes=("lam", "density"),
                   log=log)
    ref = tmp_path / "ref"
    _save_model(ref, models[0])
    log = str(tmp_path / "ref.jsonl")
    run_search(base, models, "ties", lambda state: 1.0, grid={"lam": [1.0], "density": [0.5]},
               fixed={"sign_from": str(ref)}, log=log)
    with open(ref / "config.json", "a") as f:
        f.write("\n")
    with pytest.raises(ConfigError, match=r"or the sign_from reference's files \(.*ref\) changed since"):
        run_search(base, models, "ties", lambda state: 1.0, grid={"lam": [1.0], "density": [0.5]},
                   fixed={"sign_from": str(ref)}, log=log)


def test_a_folder_where_the_search_log_goes_is_said_to_be_one(tmp_path, capsys, monkeypatch):
    """hp85b c51: a folder at DIR/log.jsonl: "the search log is not a regular file, not a regular file"."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "log.jsonl").mkdir(parents=True)
    rc, _, err = run_cli(["search", "--base", "b", "--model", "x", "--evaluator", "e:f", "--dir", "d"], capsys)
    assert rc == 1 and "the search log is a directory, not a regular file" in err, err


def test_validate_names_a_missing_reference_beside_a_missing_model_and_every_unknown_key(tmp_path, capsys):
    """hp85a c56: validate named a missing model but not a missing parameters.sign_from beside it; of a model entry's
    two unknown keys only the first; c57: a sign_from reference holding tensors the base lacks passed unseen."""
    import torch

    import tiesmerge
    from helpers_ckpt import run_cli

    g = torch.Generator().manual_seed(4)
    base = {"a.weight": torch.randn(4, 4, generator=g)}
    _save_model(tmp_path / "base", base)
    _save_model(tmp_path / "m0", {"a.weight": base["a.weight"] + 0.1})
    _save_model(tmp_path / "m1", {"a.weight": base["a.weight"] - 0.2})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ties\nbase: ./base\nmodels: [./m0, ./nothere]\nparameters: {sign_from: ./no_ref}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 1 and "nothere: no such file" in err and "no_ref: no such file or directory (cannot read the " \
                                                           "reference model)" in err, err
    recipe.write_text("method: ties\nbase: ./base\nmodels:\n  - {path: ./m0, density: 0.3, colour: red}\n"
                      "  - ./m1\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and "unknown key 'density'" in err and "unknown key 'colour'" in err, err
    _save_model(tmp_path / "ref", {"a.weight": base["a.weight"] + 0.3, "lm_head.weight": torch.ones(9, 4)})
    with pytest.warns(UserWarning, match=r"the reference holds 1 tensor\(s\) the base lacks, first 'lm_head.weight'"):
        tiesmerge.merge(str(tmp_path / "base"), [str(tmp_path / "m0"), str(tmp_path / "m1")], "ties",
                        sign_from=str(tmp_path / "ref"))


def test_empty_positional_arguments_and_flags_given_to_validate_are_named(tmp_path, capsys, monkeypatch):
    """hp85a c18: `merge ''` was "argument 2 is empty", hinted "leave the option out"; `validate --base B --model M`
    took B for the recipe and said only "unrecognized arguments"."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    for argv, name in ((["merge", "", "-o", "o"], "RECIPE"), (["methods", ""], "NAME")):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and f"error: the {name} argument is empty" in err and "leave it out" in err, err
    with pytest.raises(SystemExit):
        run_cli(["validate", "--base", "b", "--model", "m"], capsys)
    assert "validate checks a recipe file: to check flags without merging" in capsys.readouterr().err


def test_a_quantization_config_nested_deeper_is_seen(tmp_path):
    """hp85a c13: text_config.vision_config.quantization_config (two levels deep) merged silently."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError

    base = _save_model(tmp_path / "b", {"a.weight": torch.zeros(4)})
    deep = _save_model(tmp_path / "q", {"a.weight": torch.ones(4)},
                       {"model_type": "toy", "text_config": {"vision_config": {"quantization_config":
                                                                               {"quant_method": "gptq"}}}})
    with pytest.raises(CheckpointError, match="declares text_config.vision_config.quantization_config, quant_method "
                                              "gptq"):
        tiesmerge.merge(base, [deep], "task_arithmetic")


def test_a_search_over_a_methods_switch_points_to_tune(tmp_path):
    """hp85b c56: `search --method model_stock` (its grid: filter_wise) said "its merge has no option to tune", which
    tune, sweeping filter_wise, and `tiesmerge methods` contradict."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match=r"'filter_wise' to search \(filter_wise is a switch: `tiesmerge tune` "
                                          r"sweeps it, search varies numbers; model_stock has none\)") as caught:
        build_space("model_stock", 2)
    assert "no option to tune" not in str(caught.value)


def test_an_evaluator_closing_stdout_does_not_end_the_search_as_a_bug(monkeypatch):
    """hp84b c53: an evaluator that closed sys.stdout ended tune with "unexpected ValueError: I/O operation on closed
    file ... this is a bug in tiesmerge"."""
    import io
    import sys

    import torch

    import tiesmerge

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    closed = []

    def closes_stdout_c53(state):
        sys.stdout.close()
        closed.append(sys.stdout)
        return 1.0

    g = torch.Generator().manual_seed(5)
    models = [{"w": torch.randn(8, generator=g)} for _ in range(2)]
    with pytest.warns(UserWarning, match="closed or replaced sys.stdout; tiesmerge put it back after each call"):
        result = tiesmerge.tune({"w": torch.zeros(8)}, models, "ties", closes_stdout_c53,
                                grid={"lam": [1.0, 2.0], "density": [0.5]})
    assert len(closed) == 2 and not sys.stdout.closed and result.best.score == 1.0
    print("still writable")


def test_a_resume_refused_for_changed_state_dicts_does_not_speak_of_files(tmp_path):
    """hp85b c42: run_search on state dicts, one changed in memory: refused (right) as "the models' files ... their
    inode, size, modification or change time: a chmod ..."."""
    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(8, 8, generator=g)}
    models = [{"w": base["w"] + 0.01 * torch.randn(8, 8, generator=g)} for _ in range(2)]
    log = str(tmp_path / "l.jsonl")
    run_search(base, models, "ties", lambda state: 1.0, strategy="random", budget=2, axes=("lam",), log=log)
    models[0]["w"] += 1e-3
    with pytest.raises(ConfigError, match=r"the inputs' tensors \(state dicts given in memory\): they differ") as c:
        run_search(base, models, "ties", lambda state: 1.0, strategy="random", budget=3, axes=("lam",), log=log)
    assert "chmod" not in str(c.value)


def test_a_model_rewritten_during_tune_is_said_to_have_changed(tmp_path):
    """hp85b c37: a model's weights appended to during tune: the next merge's read failed first, "not a readable
    safetensors file ... download or copy it again", not "model 0 changed while tune ran"."""
    import torch

    import tiesmerge
    from tiesmerge.errors import TiesMergeError

    g = torch.Generator().manual_seed(7)
    base = _save_model(tmp_path / "b", {"w.weight": torch.randn(8, generator=g)})
    models = [_save_model(tmp_path / f"m{k}", {"w.weight": torch.randn(8, generator=g)}) for k in range(2)]

    def appends(state):
        with open(tmp_path / "m0" / "model.safetensors", "ab") as f:
            f.write(b"x")
        return 1.0

    with pytest.raises(TiesMergeError, match="model 0 changed while tune ran") as caught:
        tiesmerge.tune(base, models, "ties", appends, grid={"density": [0.2, 0.3], "lam": [1.0]})
    assert "download" not in str(caught.value) + str(caught.value.hint)


@pytest.mark.parametrize("method, grid", [("slerp", {"t": [0.3, 0.6]}), ("ties", {"density": [0.5], "lam": [1.0]})])
def test_an_evaluator_changing_its_argument_leaves_best_state_whole(method, grid):
    """hp87b c41: tune with a method without lam (slerp) handed back as best_state the very state the evaluator had
    zeroed in place (the lam path was protected since hp40 T1)."""
    import torch

    import tiesmerge

    g = torch.Generator().manual_seed(8)
    base = {"w": torch.randn(8, generator=g)}
    models = [{"w": base["w"] + torch.randn(8, generator=g)} for _ in range(2)]

    def zeroes(state):
        for value in state.values():
            value.mul_(0)
        return 1.0

    result = tiesmerge.tune(base, models, method, zeroes, grid=grid)
    options = {k: v for k, v in result.best.options.items()}
    lam = {"lam": result.best.lam} if result.best.lam is not None else {}
    expected = tiesmerge.merge(base, models, method, **options, **lam)
    assert torch.allclose(result.best_state["w"], expected["w"]) and result.best_state["w"].abs().sum() > 0


def test_a_file_written_at_the_json_path_during_tune_is_kept(tmp_path, capsys, monkeypatch):
    """hp87b c66: a file written at tune's --json path while tune ran (by the evaluator, or any process) was replaced
    by the scores without a word: checked at the start only. The hint of the refusal wrote "-o None" without -o."""

    from helpers_ckpt import run_cli

    _folder_family(tmp_path, monkeypatch, 9)
    (tmp_path / "ev_c66.py").write_text("def score(state):\n    open('scores.json', 'w').write('mine\\n')\n"
                                        "    return 1.0\n")
    rc, out, err = run_cli(["tune", "--base", "b", "--model", "m0", "--model", "m1", "--evaluator", "ev_c66:score",
                            "--grid", "density=0.5", "--grid", "lam=1", "--json", "scores.json"], capsys)
    assert rc == 1 and "scores.json: --json would replace a file tiesmerge did not write" in err, err
    assert (tmp_path / "scores.json").read_text() == "mine\n" and "-o None" not in err and "-o OUT" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiesmerge-")]


@pytest.mark.parametrize("forward", [None, 5, "object", "linear"])
def test_adapt_given_something_that_is_no_forward_says_so(tmp_path, forward):
    """hp87b c57: adapt(forward=None / 5 / object() / nn.Linear) failed inside as a raw AttributeError ('NoneType'
    object has no attribute 'to'; 'Linear' object has no attribute 'prefix')."""
    import torch

    import tiesmerge
    from tiesmerge.errors import ConfigError

    forward = {"object": object(), "linear": torch.nn.Linear(2, 2)}.get(forward, forward)
    base = {"w": torch.zeros(2, 2)}
    models = [{"w": torch.ones(2, 2)}, {"w": -torch.ones(2, 2)}]
    rows = [{"text": "good fun"}, {"text": "bad film"}]
    with pytest.raises(ConfigError, match=r"forward=.*: a forward is a kind's name \(classifier, encoder, choice\) or "
                                          r"a task forward module"):
        tiesmerge.adapt(base, models, [rows, rows], steps=1, batch_size=2, forward=forward)


@pytest.mark.parametrize("stop", ["refused", "interrupted"])
def test_a_demo_workdir_whose_parents_it_made_leaves_none_of_them(tmp_path, capsys, monkeypatch, stop):
    """hp87b c75: `demo --workdir wd/x/y` refused (disk space) or interrupted removed y but left wd/ and wd/x/, which
    it had made; a folder above that already held something stays."""
    from pathlib import Path

    from helpers_ckpt import run_cli
    from tiesmerge.cli import demo
    from tiesmerge.errors import OutputError

    def fails(workdir, million_params):
        (Path(workdir) / "base").mkdir()
        if stop == "interrupted":
            raise KeyboardInterrupt
        raise OutputError(f"{workdir}: the demo's models and merges need 130 GiB but only 75 GiB is free there")

    monkeypatch.setattr(demo, "run_demo", fails)
    rc, _, err = run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", tmp_path / "wd" / "x" / "y"], capsys)
    assert rc == (130 if stop == "interrupted" else 1), err
    assert not (tmp_path / "wd").exists(), sorted(str(p) for p in tmp_path.rglob("*"))
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "mine.txt").write_text("mine")
    run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", tmp_path / "keep" / "x" / "y"], capsys)
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["mine.txt"]


def _tiny_family():
    import torch

    g = torch.Generator().manual_seed(10)
    base = {"w": torch.randn(8, generator=g)}
    return base, [{"w": base["w"] + torch.randn(8, generator=g)} for _ in range(3)]


def test_the_search_notes_of_pass_87(tmp_path):
    """hp87b c24: "scope ='bogus'"; c60: slerp with 3 models refused per candidate with a hint about ranges and "the
    scores so far stay in the search's log" though none was scored; c83: a grid search recorded any --seed and refused
    a resume with another; c90: no finite score was a ConfigError from run_search (tune: an EvaluatorError)."""
    import warnings

    from tiesmerge.errors import ConfigError, EvaluatorError
    from tiesmerge.tuning import run_search

    base, models = _tiny_family()
    with pytest.raises(ConfigError, match=r"fixed\['scope'\]: scope='bogus' is not one of"):
        run_search(base, models[:2], "ties", lambda s: 1.0, strategy="random", budget=2, axes=("lam",),
                   fixed={"scope": "bogus"})
    with pytest.raises(ConfigError, match="slerp merges exactly 2 models, got 3") as caught:
        run_search(base, models, "slerp", lambda s: 1.0, strategy="random", budget=2, axes=("t",))
    assert "candidates 0" not in str(caught.value) and "scores so far" not in caught.value.hint
    log = str(tmp_path / "g.jsonl")
    with pytest.warns(UserWarning, match="the grid strategy draws nothing, so the seed changes no candidate"):
        run_search(base, models[:2], "ties", lambda s: 1.0, grid={"lam": [1.0], "density": [0.5]}, seed=2**32 - 1,
                   log=log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = run_search(base, models[:2], "ties", lambda s: 1.0, grid={"lam": [1.0], "density": [0.5]}, seed=5,
                           log=log)
    assert again.best.score == 1.0
    with pytest.raises(EvaluatorError, match=r"no candidate got a finite score \(1 scored: nan\)"):
        run_search(base, models[:2], "ties", lambda s: float("nan"), grid={"lam": [1.0], "density": [0.5]})


def test_cli_wording_of_pass_87(tmp_path, capsys, monkeypatch):
    """hp87b c87: `--evaluator pkg..m:f` said as a module whose code raised, hinted to fix it; c70: an async
    evaluator's error followed by Python's "coroutine ... was never awaited" naming tiesmerge's own line; c80: a log
    at /dev/null hinted "remove it", --json /dev/stdout "remove the link yourself"."""
    from helpers_ckpt import run_cli
    from tiesmerge.errors import EvaluatorError, OutputError
    from tiesmerge.paths import check_output_file
    from tiesmerge.tuning import run_search
    from tiesmerge.tuning.evaluator import read_score

    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["tune", "--base", "b", "--model", "m", "--evaluator", "pkg..m:f"], capsys)
    assert rc == 2 and "'pkg..m' is not a Python module name" in err and "fix the module" not in err, err

    async def scores(state):
        return 1.0

    coroutine = scores({})
    with pytest.raises(EvaluatorError, match="returned a coroutine: it is an async function"):
        read_score(coroutine, "ev")
    assert coroutine.cr_frame is None  # closed: no "was never awaited" warning when it is collected
    base, models = _tiny_family()
    with pytest.raises(OutputError) as caught:
        run_search(base, models[:2], "ties", lambda s: 1.0, grid={"lam": [1.0], "density": [0.5]}, log="/dev/null")
    assert "remove it" not in caught.value.hint and "log=None keeps no log" in caught.value.hint
    (tmp_path / "out").symlink_to("/proc/self/fd/1")
    with pytest.raises(OutputError) as caught:
        check_output_file(tmp_path / "out", False, [], "--json")
    assert "remove the link yourself" not in caught.value.hint and "written to a regular file" in caught.value.hint


def test_a_search_log_removed_while_the_search_runs_is_written_again(tmp_path):
    """hp87b c62: the log removed while the search ran: every later score went to an unlinked file, lost at exit, and
    the summary named a log that no longer existed."""
    import json
    import os

    from tiesmerge.tuning import run_search

    base, models = _tiny_family()
    log = tmp_path / "s" / "log.jsonl"

    def removes(state):
        if log.exists():
            os.unlink(log)
        return 1.0

    with pytest.warns(UserWarning, match="the search log was removed while the search ran; tiesmerge wrote it again"):
        run_search(base, models[:2], "ties", removes, grid={"lam": [1.0, 2.0], "density": [0.5]}, log=str(log))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 3 and "format" in lines[0]  # the header and both scores


def test_adapts_dry_run_refuses_what_the_run_refuses_at_once():
    """hp87b c52: `adapt --task-names x x --dry-run` and `--forward encoder` without --heads passed the dry run (exit
    0) that the run refuses at once; the encoder's refusal spoke of "class descriptions in --heads" never given."""
    import torch

    from tiesmerge.adamerging.run import check_adapt_request
    from tiesmerge.errors import ConfigError

    base = {"w": torch.zeros(2)}
    models = [{"w": torch.ones(2)}, {"w": -torch.ones(2)}]
    rows = [{"text": "good fun"}, {"text": "bad film"}]
    with pytest.raises(ConfigError, match=r"two tasks are named 'x' \(the names given\)"):
        check_adapt_request(base, models, [rows, rows], tasks=["x", "x"])
    with pytest.raises(ConfigError, match="--forward encoder needs --heads FILE"):
        check_adapt_request(base, models, [rows, rows], forward="encoder")


def test_the_cancelling_weights_warning_measures_the_divisor_the_merge_uses():
    """hp87a c77: the elected mean divides by the float32 sum of the agreeing weights (0 divides by 1); the warning
    summed exactly: 1, -0.999999999 were "up to 2e+09 times" (float32's sum is 0: the merge moved 1.4 times), 0.1,
    0.2, -0.3 "2.162e+16" (the bound is 5)."""
    import warnings

    import torch

    import tiesmerge
    from tiesmerge.engine.weight_scale import _mean_amplification

    assert _mean_amplification([1, -0.999999999]) == 2.0
    assert _mean_amplification([0.1, 0.2, -0.3]) == pytest.approx(5.0, rel=1e-6)
    assert _mean_amplification([1, -0.999]) == pytest.approx(1999.03, rel=1e-5)  # float32's -0.999
    g = torch.Generator().manual_seed(11)
    base = {"w": torch.zeros(64)}
    models = [{"w": torch.randn(64, generator=g)} for _ in range(3)]
    for weights in ([1, -0.999999999, 1], [0.1, 0.2, -0.3]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = tiesmerge.merge(base, models, "ties", weights=weights, density=1.0)
        assert not [w for w in caught if "opposite signs" in str(w.message)], weights
        reach = max(float(m["w"].abs().max()) for m in models)
        assert float(merged["w"].abs().max()) <= 5.0 * reach


def test_recipe_pointers_of_pass_87(tmp_path, capsys):
    """hp87a c74: a per-model density: hinted "parameters: {densities: [...]}" under every method, though only ties
    takes densities; c75: mergekit's `{model: ./a}` entry in a tiesmerge recipe got no pointer to path:; c90: a
    tokenizer.json given as the recipe listed its keys as recipe typos ("did you mean 'device'?")."""
    from helpers_ckpt import run_cli

    recipe = tmp_path / "r.yaml"
    for method, said in (("ties", "parameters: {densities: [...]}"),
                         ("della", "della takes one density for every model: parameters: {density: ...}"),
                         ("task_arithmetic", "task_arithmetic has no density option")):
        recipe.write_text(f"method: {method}\nbase: b\nmodels:\n  - {{path: x, density: 0.5}}\n  - y\n")
        rc, _, err = run_cli(["validate", recipe], capsys)
        assert rc == 2 and said in err, (method, err)
        if method != "ties":
            assert "densities" not in err, err
    recipe.write_text("method: ties\nbase: b\nmodels:\n  - {model: ./a, weight: 1}\n  - {model: ./c}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and "models[0]: model: is mergekit's key; a tiesmerge recipe's entry is {path: './a'" in err, err
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"version": "1.0", "added_tokens": [], "pre_tokenizer": None, "decoder": None,
                                     "model": {"type": "WordLevel"}}))
    rc, _, err = run_cli(["merge", tokenizer, "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "a tokenizer's file (added_tokens, pre_tokenizer), not a recipe" in err, err
    assert "did you mean" not in err


def test_switch_words_and_small_wordings_of_pass_87(tmp_path, capsys, monkeypatch):
    """hp87a c04: `--debug false` read "false" as the recipe; c86: `--filter-wise=maybe`, `--dry-run=` ended in
    argparse's "ignored explicit argument" after the whole usage; c43: "shard_size apply to"; c110: analyze with 13
    models hinted a generic example."""
    import torch

    import tiesmerge
    from helpers_ckpt import run_cli
    from tiesmerge.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    base = _save_model(tmp_path / "b", {"w.weight": torch.zeros(4)})
    models = [_save_model(tmp_path / f"m{k}", {"w.weight": torch.full((4,), k + 1.0)}) for k in range(2)]
    common = ["merge", "--base", base, "--model", models[0], "--model", models[1], "-o", tmp_path / "o", "--dry-run"]
    rc, out, err = run_cli([*common, "--debug", "false"], capsys)
    assert rc == 0 and "recipe" not in err, err
    for given, flag in ((["--method", "model_stock", "--filter-wise=maybe"], "--filter-wise"), (["--dry-run="], None)):
        rc, _, err = run_cli([*common, *given], capsys)
        flag = flag or "--dry-run"
        assert rc == 2 and f"{flag} is a switch: it takes no value, or true/false" in err, err
        assert "ignored explicit argument" not in err and "usage:" not in err
    with pytest.raises(ConfigError, match="shard_size applies to a written output"):
        tiesmerge.merge(base, models, "ties", shard_size="1KB")
    with pytest.raises(ConfigError) as caught:
        tiesmerge.analyze({"w": torch.zeros(4)}, [{"w": torch.full((4,), k + 1.0)} for k in range(13)])
    assert "analyze 12 models or fewer" in caught.value.hint


def test_model_notes_of_pass_87(tmp_path):
    """hp87a c83: iso_cts with common_fraction 1 is iso_c, without a word; c95: a float8 copy of a fine-tune merged
    into a float16 base silently, its task vector mostly float8's rounding; c107: an MLX checkpoint hinted to
    dequantize with transformers, which does not load it."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError

    g = torch.Generator().manual_seed(12)
    base = {"w": torch.randn(4, 4, generator=g)}
    models = [{"w": base["w"] + torch.randn(4, 4, generator=g)} for _ in range(2)]
    with pytest.warns(UserWarning, match="common_fraction = 1 gives the whole rank to the common subspace"):
        tiesmerge.merge(base, models, "iso_cts", common_fraction=1)
    half = {"w": base["w"].half()}
    eight = [{"w": m["w"].to(torch.float8_e4m3fn)} for m in models]
    with pytest.warns(UserWarning, match=r"model 0 stores 1 merged tensor\(s\) as float8_e4m3fn .* where the base is "
                                         r"wider"):
        tiesmerge.merge(half, eight, "ties")
    b = _save_model(tmp_path / "b", {"l.weight": torch.zeros(4, 4)})
    mlx = _save_model(tmp_path / "mlx", {"l.weight": torch.ones(4, 4)},
                      {"model_type": "llama", "quantization": {"group_size": 64, "bits": 4}})
    with pytest.raises(CheckpointError) as caught:
        tiesmerge.merge(b, [mlx], "task_arithmetic")
    assert "mlx_lm" in caught.value.hint and "transformers" not in caught.value.hint


def test_adapter_errors_say_what_to_do(tmp_path):
    """hp87a c113, c119: a rank_pattern given as a list, and a saved full tensor of another shape than the base's,
    fell back to the command line's generic "`tiesmerge merge --help` lists the options" hint."""
    import torch
    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.errors import TiesMergeError

    base = {"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8), "model.norm.weight": torch.ones(8)}
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    for name, extra, tensors in (
            ("list", {"rank_pattern": [["up_proj", 2]]}, {}),
            ("mts", {"modules_to_save": ["norm"]}, {"base_model.model.model.norm.weight": torch.ones(12)})):
        folder = tmp_path / name
        folder.mkdir()
        save_file({f"{prefix}.lora_A.weight": torch.ones(2, 8), f"{prefix}.lora_B.weight": torch.ones(8, 2),
                   **tensors}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["up_proj"], **extra}))
        with pytest.raises(TiesMergeError) as caught:
            tiesmerge.merge(base, [str(folder)], "task_arithmetic")
        assert caught.value.hint and "--help" not in caught.value.hint, (name, caught.value)


def _mergekit_family(tmp_path):
    import torch

    g = torch.Generator().manual_seed(13)
    base = _save_model(tmp_path / "base", {"w.weight": torch.randn(4, 4, generator=g)})
    models = [_save_model(tmp_path / n, {"w.weight": torch.randn(4, 4, generator=g)}) for n in ("a", "b")]
    return base, models


def test_flags_over_a_mergekit_recipe_are_pointed_where_its_method_takes_them(tmp_path, capsys):
    """hp88a c66: `--lam` over mergekit's linear was hinted "--lam is parameters.lambda", which linear then refused;
    `--t` over ties likewise."""
    from helpers_ckpt import run_cli

    _mergekit_family(tmp_path)
    linear = tmp_path / "lin.yaml"
    linear.write_text("merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: 1}\n"
                      "  - model: ./b\n    parameters: {weight: 1}\n")
    rc, _, err = run_cli(["merge", linear, "-o", tmp_path / "o", "--lam", "2", "--dry-run"], capsys)
    assert rc == 2 and "mergekit's linear has no --lam (lambda)" in err and "--lam is parameters.lambda" not in err
    ties = tmp_path / "ties.yaml"
    ties.write_text("merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n    parameters: {weight: 1, "
                    "density: 0.5}\n  - model: ./b\n    parameters: {weight: 1, density: 0.5}\n")
    rc, _, err = run_cli(["merge", ties, "-o", tmp_path / "o", "--t", "0.3", "--density", "0.4", "--dry-run"], capsys)
    assert rc == 2 and "--density is parameters.density" in err and "mergekit's ties has no --t (t)" in err, err


def test_a_false_word_for_a_plain_flag_counts(tmp_path, capsys, monkeypatch):
    """hp88a c67: `--allow-distant false` over a recipe's allow_distant: true was dropped, and the recipe's true merged
    a model of another pretraining run; `--force --force=no` replaced the output; c85: `--force Y` was read as a
    recipe that does not exist."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    base, models = _mergekit_family(tmp_path)
    out = tmp_path / "o"
    rc, _, _ = run_cli(["merge", "--base", base, "--model", models[0], "--model", models[1], "-o", out], capsys)
    assert rc == 0
    rc, _, err = run_cli(["merge", "--base", base, "--model", models[0], "--model", models[1], "-o", out, "--force",
                          "--force=no"], capsys)
    assert rc != 0 and "--force then --force=no given twice: only the last value counts" in err, err
    assert "is not empty (an earlier tiesmerge output)" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{models[0]}, {models[1]}]\nallow_distant: true\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o2", "--dry-run", "--allow-distant", "false"], capsys)
    assert rc == 0 and "--allow-distant false replaces the recipe's allow_distant: true" in err, err
    from tiesmerge.cli import commands

    seen = {}
    real = commands.recipe_from_dict

    def spy(data, **kwargs):
        seen.update(data)
        return real(data, **kwargs)

    monkeypatch.setattr(commands, "recipe_from_dict", spy)
    run_cli(["merge", recipe, "-o", tmp_path / "o2", "--dry-run", "--allow-distant=false"], capsys)
    assert seen.get("allow_distant") is False
    rc, _, err = run_cli(["merge", "--base", base, "--model", models[0], "--model", models[1], "-o", tmp_path / "o3",
                          "--force", "Y"], capsys)
    assert rc == 2 and "--force Y: --force is a switch: it takes no value, or true/false" in err, err


def test_mergekit_words_for_methods_and_keys_point_to_ours(tmp_path, capsys):
    """hp88a c68: `--method linear` (mergekit's name for average) was "did you mean 'dare_linear'?", which drops 90%
    of the entries at random; c72: a mergekit per-model parameters: and c74: tokenizer_source: in a tiesmerge recipe
    got no pointer; c73: special_tokens_map.json and vocab.json as the recipe were listed as unknown keys; c78: a
    recipe of two YAML documents was "not valid YAML", "damaged"."""
    from helpers_ckpt import run_cli

    rc, _, err = run_cli(["methods", "linear"], capsys)
    assert rc == 2 and "mergekit's linear is average" in err and "dare_linear'?" not in err, err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ties\nbase: b\nmodels:\n  - {path: x, parameters: {weight: 1}}\n  - y\n"
                      "tokenizer_source: union\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and "mergekit's per-model parameters: are, here, the entry's weight:" in err, err
    assert "tokenizer_source is mergekit's key: a tiesmerge recipe writes vocab_policy: union" in err, err
    for name, data in (("special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>"}),
                       ("vocab.json", {f"t{k}": k for k in range(20)})):
        (tmp_path / name).write_text(json.dumps(data))
        rc, _, err = run_cli(["validate", tmp_path / name], capsys)
        assert rc == 2 and "a tokenizer's file" in err and "unknown key" not in err, err
    recipe.write_text("method: ties\nbase: b\nmodels: [x, y]\n---\nmethod: ties\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and "holds more than one YAML document" in err and "damaged" not in err, err


def test_warnings_and_wordings_of_pass_88_merge_side(tmp_path):
    """hp88a c69: consensus tall_lambda 0 is task arithmetic, no word; c70: normalized linear merges with every weight
    negative equal the positive ones', no word; c77: a quantized sign_from reference was told about "averaging";
    c81: the large-lam warning quoted TIES's grid for every method."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError

    g = torch.Generator().manual_seed(14)
    base = {"w": torch.zeros(4, 4)}
    models = [{"w": torch.randn(4, 4, generator=g)} for _ in range(2)]
    with pytest.warns(UserWarning, match="tall_lambda = 0 makes each TALL mask keep every entry"):
        tiesmerge.merge(base, models, "consensus", tall_lambda=0.0)
    with pytest.warns(UserWarning, match="every weight is negative .* normalize_weights divides"):
        tiesmerge.merge(base, models, "task_arithmetic", weights=[-1, -2], normalize_weights=True)
    with pytest.warns(UserWarning, match=r"tsv_m searches lam 0.1 to 3, its default is 1\); check the value"):
        tiesmerge.merge(base, models, "tsv_m", lam=500)
    b = _save_model(tmp_path / "b", {"l.weight": torch.zeros(4, 4)})
    ms = [_save_model(tmp_path / f"m{k}", {"l.weight": torch.randn(4, 4, generator=g)}) for k in range(2)]
    ref = _save_model(tmp_path / "ref", {"l.weight": torch.ones(4, 4, dtype=torch.int8)})
    with pytest.raises(CheckpointError, match="so their signs are not the reference's") as caught:
        tiesmerge.merge(b, ms, "ties", sign_from=ref)
    assert "averaged" not in str(caught.value)


def test_statistics_and_buffers_of_pass_88(tmp_path):
    """hp88a c75: a Gram statistic that is not symmetric was hinted "an older tiesmerge wrote statistics that
    overflow"; c80: every model's Fisher all zeros merged as the plain mean without a word; c71: a model's integer
    buffer of another shape was dropped without the warning a same-shape one gets; c76: a key twice in an
    adapter_config.json (lora_alpha 16, then 1600) was taken silently."""
    import torch
    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.errors import CheckpointError, TiesMergeError
    from tiesmerge.stats import save_stats

    g = torch.Generator().manual_seed(15)
    base = {"l.weight": torch.randn(4, 4, generator=g)}
    models = [{"l.weight": torch.randn(4, 4, generator=g)} for _ in range(2)]
    zeros = [{"l.weight": torch.zeros(4, 4)} for _ in range(2)]
    with pytest.warns(UserWarning, match="every model's fisher statistics are all zeros"):
        tiesmerge.merge(base, models, "fisher", stats=zeros)
    asym = torch.eye(4)
    asym[0, 1] = 5.0
    with pytest.raises(TiesMergeError) as caught:
        tiesmerge.merge(base, models, "regmean", stats=[{"l.weight": asym}, {"l.weight": torch.eye(4)}])
    assert "not symmetric" in str(caught.value) and "overflow" not in (caught.value.hint or "")
    buffered = {**base, "pos_ids": torch.arange(4)}
    longer = [{**m, "pos_ids": torch.arange(8)} for m in models]
    with pytest.warns(UserWarning, match=r"integer or boolean tensor\(s\) are copied from the base, but model\(s\) "
                                         r"0, 1 hold other values there \('pos_ids'\)"):
        tiesmerge.merge(buffered, longer, "task_arithmetic")
    adapter = tmp_path / "ad"
    adapter.mkdir()
    save_file({"base_model.model.l.lora_A.weight": torch.ones(2, 4), "base_model.model.l.lora_B.weight":
               torch.ones(4, 2)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 16, '
                                                 '"target_modules": ["l"], "lora_alpha": 1600}')
    with pytest.raises(CheckpointError, match="gives the key 'lora_alpha' twice"):
        tiesmerge.merge(base, [str(adapter)], "task_arithmetic")
    del save_stats


def test_an_output_beside_a_recipe_in_a_folder_with_a_config_is_not_inside_it(tmp_path, capsys):
    """hp88a c79: `merge proj/recipe.yaml -o proj/merged` was refused as "the output lies inside the recipe" when proj/
    also held a config.json (the rule for a weights file given from a model's folder)."""
    from helpers_ckpt import run_cli

    base, models = _mergekit_family(tmp_path)
    project = tmp_path / "proj"
    project.mkdir()
    (project / "config.json").write_text("{}")
    recipe = project / "recipe.yaml"
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{models[0]}, {models[1]}]\n")
    rc, _, err = run_cli(["merge", recipe, "-o", project / "merged"], capsys)
    assert rc == 0 and (project / "merged" / "model.safetensors").is_file(), err


def test_search_inputs_of_pass_88(tmp_path):
    """hp88b c34: run_search(fixed={"sign_from": REF}, log="REF/log.jsonl") wrote the log into the reference's folder
    (c35: a log refused as "the output", hinted "an output directory"); c39: lam held at 0 searched density over the
    base; c75: a LoRA adapter as the base failed as "unexpected RuntimeError: bind(base) the adapter"; c77: a damaged
    base left a log holding only its header, which refused the same search once the base was mended."""
    import os

    import torch
    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.errors import ConfigError, OutputError, TiesMergeError
    from tiesmerge.tuning import run_search

    g = torch.Generator().manual_seed(16)
    base_sd = {"a.weight": torch.randn(8, 8, generator=g)}
    base = _save_model(tmp_path / "base", base_sd)
    models = [_save_model(tmp_path / f"m{k}", {"a.weight": base_sd["a.weight"] + torch.randn(8, 8, generator=g)})
              for k in range(3)]
    with pytest.raises(OutputError, match="the search log lies inside the reference model") as caught:
        run_search(base, models[:2], "ties", lambda s: 1.0, grid={"lam": [1.0], "density": [0.5]},
                   fixed={"sign_from": models[2]}, log=os.path.join(models[2], "log.jsonl"))
    assert "log= a path outside the inputs" in caught.value.hint and not os.path.exists(models[2] + "/log.jsonl")
    with pytest.raises(ConfigError, match=r"searching density changes nothing: the held lam is 0"):
        run_search(base, models[:2], "ties", lambda s: 1.0, strategy="random", budget=3, axes=("density",),
                   fixed={"lam": 0.0})
    with pytest.raises(ConfigError, match="lam 0, the grid's only lam, makes every point the base itself"):
        tiesmerge.tune(base, models[:2], "ties", lambda s: 1.0, grid={"lam": [0.0], "density": [0.1, 0.2]})
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                          "target_modules": ["a"]}))
    save_file({"base_model.model.a.lora_A.weight": torch.ones(2, 8), "base_model.model.a.lora_B.weight":
               torch.ones(8, 2)}, str(lora / "adapter_model.safetensors"))
    log = tmp_path / "s" / "log.jsonl"
    for call in (lambda: tiesmerge.tune(str(lora), models[:2], "ties", lambda s: 1.0,
                                        grid={"lam": [1.0], "density": [0.5]}),
                 lambda: run_search(str(lora), models[:2], "ties", lambda s: 1.0, strategy="random", budget=2,
                                    axes=("lam",), log=str(log))):
        with pytest.raises(ConfigError, match="the base is a PEFT lora adapter, not a model"):
            call()
    assert not (tmp_path / "s").exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    whole = (tmp_path / "base" / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(whole[:100])
    with pytest.raises(TiesMergeError):
        run_search(str(damaged), models[:2], "ties", lambda s: 1.0, strategy="random", budget=2, axes=("lam",),
                   log=str(log))
    assert not (tmp_path / "s").exists()


def test_tune_and_adapt_notes_of_pass_88(tmp_path, capsys, monkeypatch):
    """hp88b c44: `tune --method model_stock --grid filter_wise=true` was refused "(it has: )", though its own grid
    sweeps filter_wise; c54, c55: adapt's dry run passed a missing data file and two tasks named by one file name,
    which the run refuses at once; c16: a file taken at tune's --json path before the best merge is written is said
    then, not after it."""

    from helpers_ckpt import run_cli
    from tiesmerge.tuning.search import parse_grid

    assert parse_grid("model_stock", ["filter_wise=true"])["filter_wise"] == (True,)
    _folder_family(tmp_path, monkeypatch, 17)
    adapt = ["adapt", "--base", "b", "--model", "m0", "--model", "m1", "--dry-run", "-o", "out"]
    rc, _, err = run_cli([*adapt, "--data", "missing.jsonl", "--data", "missing2.jsonl"], capsys)
    assert rc == 2 and "missing.jsonl: no such file or directory" in err, err
    (tmp_path / "sub").mkdir()
    for path in ("d1.jsonl", "sub/d1.jsonl"):
        (tmp_path / path).write_text('{"text": "good fun"}\n{"text": "bad film"}\n')
    rc, _, err = run_cli([*adapt, "--data", "d1.jsonl", "--data", "sub/d1.jsonl"], capsys)
    assert rc == 2 and "two tasks are named 'd1' (their data files' names)" in err, err
    (tmp_path / "ev_c16.py").write_text("import os\ndef score(state):\n    if not os.path.lexists('s.json'):\n"
                                        "        os.mkdir('s.json')\n    return 1.0\n")
    rc, _, err = run_cli(["tune", "--base", "b", "--model", "m0", "--model", "m1", "--evaluator", "ev_c16:score",
                          "--grid", "density=0.5", "--grid", "lam=1", "--json", "s.json", "-o", "best"], capsys)
    assert rc != 0 and not (tmp_path / "best").exists() and "tiesmerge merge" in err, err
