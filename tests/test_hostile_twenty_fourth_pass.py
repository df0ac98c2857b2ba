"""Issue 13, the twenty-fourth independent hostile pass (hp24): F6-F8 (F1-F5 are in test_hostile_twenty_third_pass)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers_adapters import (
    LORA_MODULES,
    peft_adapts,
    random_ia3,
    random_lora,
    tiesmerge_adapts,
    write_ia3_dir,
    write_lora_dir,
)
from helpers_ckpt import assert_no_output, make_base, run_cli, write_family_dirs, write_hf_dir
from tiesmerge.io.peft_targets import Targeting

_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _snapshot(*folders):
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config, culprit", [
    ({"target_modules": ["k_proj"]}, "target_modules ['k_proj'] does not select it"),
    ({"target_modules": r".*\.k_proj"}, "does not select it"),
    ({"target_modules": ["q_proj", "up_proj"], "exclude_modules": ["up_proj"]}, "exclude_modules names it"),
    ({"target_modules": ["q_proj", "up_proj"], "modules_to_save": ["mlp"]}, "modules_to_save names it"),
])
def test_lora_factors_its_config_does_not_adapt_are_refused(tmp_path, capsys, config, culprit):
    """F6: target_modules ["k_proj"] beside factors for q_proj merged silently; PEFT, loading that adapter, creates
    layers on k_proj only and drops the q_proj factors, so the merge was not of the adapter that runs."""
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4, config=config)
    before = _snapshot(b, lora)
    out = tmp_path / "out"
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(lora),
                          "-o", str(out)], capsys)
    assert rc != 0 and "Traceback" not in err, err
    assert "config does not adapt" in err and culprit in err and "adapter_config.json" in err, err
    assert_no_output(out)
    assert _snapshot(b, lora) == before


@pytest.mark.parametrize("config", [{"target_modules": ["q_proj", "up_proj"]},
                                    {"target_modules": r"model\.layers\.\d+\.(self_attn\.q_proj|mlp\.up_proj)"},
                                    {"target_modules": "all-linear"},
                                    {"target_modules": r"^(?!.*vision).*(q_proj|up_proj)"},  # a lookahead: unchecked
                                    {"target_modules": r".*\.k_proj", "layers_to_transform": [7]}])
def test_lora_configs_that_describe_their_factors_merge(tmp_path, capsys, config):
    """The check refuses nothing PEFT loads: list suffixes, a full-path regex, "all-linear", a regex it cannot run
    without backtracking (left unchecked); layers_to_transform is PEFT's only beside a list. (No target_modules at
    all is refused since hostile pass 31: PEFT then adapts its table's defaults for the model type.)"""
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    if config.get("layers_to_transform"):  # with a regex target PEFT ignores the layers: the regex must select
        config = {**config, "target_modules": r".*\.(q_proj|up_proj)"}
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4, config=config)
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(lora),
                          "-o", str(tmp_path / "out")], capsys)
    assert rc == 0 and "does not adapt" not in err, err


def test_ia3_vectors_its_config_does_not_adapt_are_refused(tmp_path, capsys):
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    vectors = random_ia3(base, seed=1)
    ia3 = write_ia3_dir(tmp_path / "ia3", vectors)
    import json

    config = json.loads((ia3 / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # the vectors include mlp.up_proj
    (ia3 / "adapter_config.json").write_text(json.dumps(config))
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(ia3),
                          "-o", str(tmp_path / "out")], capsys)
    assert rc != 0 and "does not adapt" in err and "up_proj" in err, err


_PEFT_CONFIGS = [
    {"target_modules": ["q_proj"]}, {"target_modules": ["layers.0.self_attn.q_proj"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "up_proj"]}, {"target_modules": ["proj"]},
    {"target_modules": r".*q_proj"}, {"target_modules": r"q_proj"}, {"target_modules": r"model\.layers\.1\..*"},
    {"target_modules": ["q_proj", "up_proj"], "exclude_modules": r".*layers\.1.*"},
    {"target_modules": ["q_proj", "up_proj"], "exclude_modules": ["1.mlp.up_proj"]},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": ["self_attn"]},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": ["layers.1"]},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": [r"layers\.\d"]},
    {"target_modules": ["q_proj", "up_proj"], "task_type": "SEQ_CLS"},
    # layers_to_transform (hp25 F1, F2): an empty list, an exact path, dotted and ordered layers_pattern
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": []},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 1},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0]},
    {"target_modules": ["model.layers.1.self_attn.q_proj", "up_proj"], "layers_to_transform": [0]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "model.layers"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": ["blocks", "layers"]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [3], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": "experts"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0, 1], "layers_pattern": "(h|layers)"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0, 1], "layers_pattern": "h|layers"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": r"(?<=model\.)layers"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": ".*x"},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": ["score|mlp"]},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": [".*fier", "layers.1"]},
    # anchors and a top-level '|' mean what they mean in PEFT's pasted expressions (hp27 F6)
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": ["self_attn$", "^model"]},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": ["q_proj|zzz"]},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": [r"layers\.0$", "^q_proj"]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": "^layers"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": r"model\.layers$"},
    {"target_modules": r".*\.q_proj", "layers_to_transform": [7]},
    # lookarounds (hp25 F13): run on the regex package under a time limit, not skipped
    {"target_modules": r"^(?!.*layers\.1\.).*proj"},
    {"target_modules": ["q_proj", "up_proj"], "exclude_modules": r"(?=.*layers\.1\.).*"},
    {"target_modules": r"(?<=self_attn\.)q_proj|.*up_proj"},
]
_PEFT_MODULES = [*LORA_MODULES, "model.layers.0.blocks.1.q_proj", "model.layers.3.mlp.experts.0.up_proj",
                 "layers.2.self_attn.q_proj", "model.h.1.up_proj", "score", "model.score.q_proj"]


@pytest.mark.parametrize("config", _PEFT_CONFIGS)
@pytest.mark.parametrize("module", _PEFT_MODULES)
def test_which_modules_are_adapted_agrees_with_peft(config, module):
    """The rule is PEFT's own (check_target_module_exists, with the heads PEFT adds to modules_to_save for a task
    type), module by module."""
    pytest.importorskip("peft.tuners.tuners_utils")
    assert tiesmerge_adapts(config, module) == peft_adapts(config, module), (config, module)


@pytest.mark.parametrize("module, names, layer", [
    ("model.layers.3.mlp.experts.0.up_proj", (), 3),  # an MoE expert's index comes after its layer's (PEFT 0.21)
    ("model.layers.3.mlp.experts.0.up_proj", ("experts",), 0),
    ("layers.2.self_attn.q_proj", (), None),  # PEFT wants a component before the layer list
    ("layers.2.self_attn.q_proj", ("layers",), 2),
    ("model.layers.1.self_attn.q_proj", ("blocks",), None),
    ("model.layers.0.blocks.1.q_proj", ("blocks", "layers"), 1),  # the first pattern that matches wins
    ("model.layers.1.self_attn.q_proj", ("model.layers",), 1),  # a pattern is a regex, dots and all
    ("model.layers." + "9" * 5000 + ".q_proj", (), -1),  # no int() of 5000 digits: an index no list holds
])
def test_the_layer_of_a_module_is_found_as_peft_finds_it(module, names, layer):
    import re

    config = {"layers_pattern": list(names), "layers_to_transform": [0]}  # the names matter only beside layers
    assert Targeting.of(config, "adapter_config.json").layer_of(module) == layer
    if len(module) > 1000:
        return
    if names:  # PEFT's own expressions (tuners_utils.check_target_module_exists)
        match = next((m for p in names if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    else:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    assert (int(match["idx"]) if match else None) == layer


def test_ctrl_c_inside_numbas_import_stops_the_command_and_keeps_numba(tmp_path):
    """F7: a Ctrl-C landing inside numba's C initialisation was printed there and turned into an ImportError: the
    merge went on without the fused kernels (some 3x slower) and exited 0. Now the signal is held through the
    import and delivered after it: the command stops, and numba is imported whole."""
    script = tmp_path / "numba_import.py"
    script.write_text(textwrap.dedent('''
        import importlib, os, signal, sys
        fired = []
        def hook(event, args):  # the Ctrl-C arrives while numba imports its C extension
            if event == "import" and args[0] == "numba._devicearray" and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGINT)
        sys.addaudithook(hook)
        cli = importlib.import_module("tiesmerge.cli.main")
        cli._terminate_like_interrupt()
        from tiesmerge.engine import fused
        try:
            fused.load()
            print("NOT STOPPED", flush=True)
        except KeyboardInterrupt:
            kernels = sys.modules.get("tiesmerge.engine.kernels")
            print("STOPPED", bool(fired), kernels is not None and kernels.numba is not None, flush=True)
    '''))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=_ENV)
    assert done.stdout.strip() == "STOPPED True True", (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr


def test_a_stop_signal_while_the_engine_imports_is_terminated_not_a_traceback(tmp_path):
    """F8: a SIGTERM after the stop handlers were installed but before main's try (the engine's imports, ~0.4 s)
    printed a `Terminated: 15` traceback and exited 1."""
    b, ms = write_family_dirs(tmp_path)
    script = tmp_path / "engine_import.py"
    script.write_text(textwrap.dedent('''
        import os, signal, sys
        fired = []
        def hook(event, args):
            if event == "import" and args[0] == "tiesmerge.engine.executor" and not fired:
                fired.append(1)
                print("FIRED", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
        sys.addaudithook(hook)
        from tiesmerge._launch import entry
        entry()
    '''))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), "merge", "--base", str(b), *sum((["--model", str(m)]
                           for m in ms), []), "-o", str(out)], capture_output=True, text=True, timeout=300, env=_ENV)
    assert "FIRED" in done.stderr, done.stderr
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert "error: terminated by SIGTERM" in done.stderr
    assert_no_output(out)


def test_a_second_stop_signal_while_one_is_held_acts_at_once():
    """Holding is for the first signal only: Ctrl-C twice during a slow import gets out."""
    from tiesmerge import stops

    with stops.held():
        assert stops.hold(2) is True  # the first: held
        assert stops.hold(2) is False  # the second: the handler acts now
    assert stops.hold(2) is False  # outside held(): never held


def test_notes_of_the_twenty_fourth_pass(tmp_path, capsys):
    """N2: one model's density keeping nothing was silent (only all of them was said); N3: t_by_name rules joined by
    ',' became one filter that matched nothing; N5: --force over a byte-identical copy spoke of "your changes";
    N6: a fine-tune whose config names another architecture merged without a word."""
    import json
    import shutil

    b, ms = write_family_dirs(tmp_path)
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    rc, _, err = run_cli(["merge", *flags, "--densities", "0.5", "1e-30", "-o", str(tmp_path / "n2")], capsys)
    assert rc == 0 and "the density of model 1 (1e-30) keeps no entry" in err and "adds nothing" in err, err

    rc, _, err = run_cli(["merge", "--method", "slerp", *flags, "--t-by-name", "mlp=0.5,self_attn=0.3",
                          "-o", str(tmp_path / "n3")], capsys)
    assert rc != 0 and "rules are separated by ';'" in err, err
    assert_no_output(tmp_path / "n3")

    rc, _, _ = run_cli(["merge", *flags, "-o", str(tmp_path / "q0")], capsys)
    assert rc == 0
    copy = tmp_path / "q1"
    shutil.copytree(tmp_path / "q0", copy, copy_function=shutil.copyfile)  # as cp -r: new modification times
    before = _snapshot(copy)
    rc, _, err = run_cli(["merge", *flags, "-o", str(copy), "--force"], capsys)
    assert rc != 0 and "their sizes are the same, so the folder may be a copy" in err, err
    assert "your changes" not in err and _snapshot(copy) == before
    with open(copy / "README.md", "a") as f:
        f.write("my note\n")
    rc, _, err = run_cli(["merge", *flags, "-o", str(copy), "--force"], capsys)
    assert rc != 0 and "would discard changes to" in err and "1 of another size: README.md" in err, err
    assert "with another modification time: " in err  # the copy's untouched files said as such (hp47 c09)

    other = tmp_path / "other"
    shutil.copytree(ms[1], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(other),
                          "-o", str(tmp_path / "n6")], capsys)
    assert rc == 0 and "names another architecture than the base's: model_type 'bert'" in err, err
    rc, _, err = run_cli(["merge", *flags, "-o", str(tmp_path / "n6b")], capsys)
    assert rc == 0 and "another architecture" not in err and "keeps no entry" not in err, err
