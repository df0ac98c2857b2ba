"""Hostile pass 40b, C30 and C31: `validate` (and `merge --dry-run`) of a recipe naming many missing models."""

from __future__ import annotations

import pytest

import tiesmerge
from helpers_ckpt import make_base, run_cli, write_hf_dir


def _recipe(tmp_path, n, extra=""):
    """A recipe merging onto a real base ``n`` models none of which exists."""
    recipe = tmp_path / f"nx{n}.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels:\n" + "".join(f"- m{i}\n" for i in range(n)) + extra)
    return recipe


@pytest.fixture
def indexed(tmp_path, monkeypatch):
    """The base's folder, and a count of the weights files opened (indexed) since: the missing models hold none,
    so every one counted is an open of the base."""
    from tiesmerge.io.safetensors_reader import SafetensorsCheckpoint

    write_hf_dir(tmp_path / "base", make_base())
    calls = []
    original = SafetensorsCheckpoint._index_file

    def counted(self, file, weight_map):
        calls.append(file)
        return original(self, file, weight_map)

    monkeypatch.setattr(SafetensorsCheckpoint, "_index_file", counted)
    return calls


@pytest.mark.parametrize("extra", ["", "parameters: {density: 2}\n"])
def test_validate_opens_the_base_a_bounded_number_of_times_whatever_the_number_of_models(tmp_path, capsys, indexed,
                                                                                         extra):
    """C30: each missing model was planned against the base on its own, opening the base twice per model (20,002
    opens for 10,000 models), beside list scans per model (10k models 15.7 s, 50k over 120 s). The base is opened a
    fixed number of times, the same for 3 models as for 3,000; the recipe's own problem (a bad density) is no
    exception."""
    counts = {}
    for n in (3, 3000):
        indexed.clear()
        rc, out, err = run_cli(["validate", str(_recipe(tmp_path, n, extra))], capsys)
        assert rc != 0 and "Traceback" not in err, err
        assert "m2: no such file or directory" in err, err
        counts[n] = len(indexed)
    assert counts[3000] == counts[3] <= 8, counts


@pytest.mark.parametrize("command", [["validate"], ["merge", "--dry-run", "--no-progress"]])
def test_a_long_list_of_problems_is_cut_and_says_how_many_more(tmp_path, capsys, indexed, command):
    """C31: the inputs' problems were printed one line each (20,000 lines, 1.2 MB of stderr for 20,000 missing
    models), with no "and N more". The first 50 are listed, then how many more; a short list stays whole."""
    out_dir = ["-o", str(tmp_path / "out")] if command[0] == "merge" else []
    rc, out, err = run_cli([command[0], str(_recipe(tmp_path, 3000)), *command[1:], *out_dir], capsys)
    assert rc != 0 and "Traceback" not in err, err
    assert "3000 problems with the inputs:" in err, err
    assert "/m49: no such file" in err and "/m50: no such file" not in err, err
    assert "... and 2950 more" in err, err
    assert len(err.splitlines()) < 60, err[-2000:]
    rc, out, err = run_cli([command[0], str(_recipe(tmp_path, 3)), *command[1:], *out_dir], capsys)
    assert "3 problems with the inputs:" in err and "m2: no such file" in err and "more" not in err, err


def test_the_api_error_keeps_every_problem_while_its_message_lists_the_first(tmp_path, indexed):
    """C31 in the API: plan_merge's error lists the first 50 problems in its message, and holds all of them in
    .problems, as a ConfigError does."""
    from tiesmerge.errors import CheckpointError

    models = [str(tmp_path / f"m{i}") for i in range(120)]
    with pytest.raises(CheckpointError) as caught:
        tiesmerge.plan_merge(str(tmp_path / "base"), models)
    assert len(caught.value.problems) == 120
    assert "... and 70 more" in caught.value.message and len(caught.value.message.splitlines()) == 52


def test_every_missing_model_is_named_beside_a_problem_of_the_base(tmp_path, capsys):
    """C30's fix names a model that does not open by its own open: beside a base that is an adapter and a recipe
    problem, every missing model is named (the plans of each against the base said only "the base is an adapter")."""
    import torch

    from helpers_adapters import write_lora_dir

    write_lora_dir(tmp_path / "abase", {"zz.q_proj": (torch.ones(2, 8), torch.ones(8, 2))}, alpha=4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ties\nbase: abase\nmodels: [gone1, gone2, gone3]\nparameters: {density: 2}\n")
    rc, out, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "5 problems:" in err and "the base is a PEFT lora adapter" in err, err
    assert all(f"gone{i}: no such file or directory" in err for i in (1, 2, 3)), err
