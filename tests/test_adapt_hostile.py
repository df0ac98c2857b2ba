"""`tiesmerge adapt` against hostile and careless input (issue 13's classes, found by the second
independent pass): the checkpoint never lands on an input, a foreign checkpoint file is a typed
error, absurd settings and empty texts are refused before any work, and the data's type is checked."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import tiesmerge
from tiesmerge.errors import ConfigError, OutputError
from tiesmerge.evaluation.forward import FunctionLogits


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _encode(rows, task):
    return torch.tensor([r["x"] for r in rows], dtype=torch.float32)


def _forward() -> FunctionLogits:
    return FunctionLogits(_net(), lambda m, b, task: m(b), encode=_encode)


def _setup(tmp_path):
    base = {k: v.detach().clone() for k, v in _net().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    files = []
    for t in range(2):
        path = tmp_path / f"task{t}.jsonl"
        path.write_text("".join(json.dumps({"text": f"ex {i}", "x": torch.randn(4, generator=g).tolist()}) + "\n"
                                for i in range(6)))
        files.append(path)
    return base, fts, files


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_checkpoint_never_replaces_a_data_file_or_an_existing_file(tmp_path):
    base, fts, files = _setup(tmp_path)
    before = _digest(files[0])
    with pytest.raises(OutputError, match="data file 0"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, checkpoint=files[0], force=True)
    assert _digest(files[0]) == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for force in (False, True):  # a user's file is never a checkpoint to replace, --force or not
        with pytest.raises(OutputError, match="would replace a file tiesmerge did not write"):
            tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, checkpoint=notes, force=force)
    assert notes.read_text() == "mine"
    # the input check comes first: no hint at a --force that would not help
    with pytest.raises(OutputError, match="is data file 0") as caught:
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, checkpoint=files[0])
    assert "--force" not in str(caught.value)
    with pytest.raises(OutputError, match="does not exist"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, checkpoint=tmp_path / "no" / "ck.pt")


@pytest.mark.parametrize("content", [b"garbage\x00\x01", b'{"step": 3}', b""])
def test_a_foreign_checkpoint_is_a_typed_error(tmp_path, content):
    base, fts, files = _setup(tmp_path)
    ck = tmp_path / "ck.pt"
    ck.write_bytes(content)
    with pytest.raises(ConfigError, match="not a checkpoint tiesmerge adapt wrote"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, checkpoint=ck, resume=True)
    assert ck.read_bytes() == content


def test_a_checkpoint_of_other_tensors_is_a_typed_error(tmp_path):
    from safetensors.torch import save_file

    base, fts, files = _setup(tmp_path)
    ck = tmp_path / "ck.safetensors"
    save_file({"coefficients": torch.zeros(3)}, str(ck))
    with pytest.raises(ConfigError, match="its fields are missing"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, checkpoint=ck, resume=True)


class _Planted:
    """A pickle that runs code when unpickled (touches a file): what a planted .pt checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_checkpoint_is_never_unpickled(tmp_path):
    import pickle

    base, fts, files = _setup(tmp_path)
    ck = tmp_path / "ck.pt"
    marker = tmp_path / "code_ran"
    ck.write_bytes(pickle.dumps({"fingerprint": "", "coefficients": _Planted(str(marker))}))
    with pytest.raises(ConfigError, match="not a checkpoint tiesmerge adapt wrote"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, checkpoint=ck, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("kwargs, message", [({"lr": 1e300}, r"lr must be in \(0, 10\]"),
                                              ({"lr": 0.0}, "lr must be in"),
                                              ({"init": 1e9}, "init must be within")])
def test_absurd_settings_are_refused_before_any_work(tmp_path, kwargs, message):
    base, fts, files = _setup(tmp_path)
    with pytest.raises(ConfigError, match=message):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, **kwargs)


def test_empty_texts_and_wrong_data_types_name_the_problem(tmp_path):
    base, fts, files = _setup(tmp_path)
    files[1].write_text(files[1].read_text() + json.dumps({"text": "  ", "x": [0, 0, 0, 0]}) + "\n")
    with pytest.raises(ConfigError, match=r"task1.jsonl: example 7 has an empty or missing 'text'"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1)
    with pytest.raises(ConfigError, match="data must list one data file"):
        tiesmerge.adapt(base, fts, 5, forward=_forward(), steps=1)
    with pytest.raises(ConfigError, match="data must list one data file"):
        tiesmerge.adapt(base, fts, str(files[0]), forward=_forward(), steps=1)
    with pytest.raises(ConfigError, match="its data is a int"):
        tiesmerge.adapt(base, fts, [files[0], 7], forward=_forward(), steps=1)


@pytest.mark.parametrize("damage,needle", [
    ("nan", "not finite"),                 # c359: resumed, then blamed the learning rate
    ("shape", "the run's coefficients are"),  # c360: 'unexpected RuntimeError ... a bug'
    ("step", "step -5 is negative"),        # c363: ran 9 steps silently
    ("entropy", "entropy history"),         # c365: 'unexpected IndexError ... a bug'
    ("adam_step_-1", r"adam.step is -1.0, where the checkpoint's step is 2"),  # hp19 F2: 'ZeroDivisionError ... a bug'
    ("adam_step_-3", r"adam.step is -3.0"),  # hp19 F2: 'unexpected RuntimeError ComplexFloat ... a bug'
    ("adam_step_nan", r"adam.step is nan"),  # hp19 F2: resumed, then blamed --lr
    ("adam_step_7", r"adam.step is 7.0"),  # another count than the checkpoint's own
    ("huge", r"coefficients reach 1e\+30, past what a run reaches in 2 steps"),  # hp19 N3: then blamed --lr
    ("group_lr", r"optimizer settings are not this run's: lr is 1e\+30 there"),  # hp20: NaN blamed on --lr
    ("group_betas", r"betas is \[1, 1\] there"),  # hp20: 'unexpected ZeroDivisionError ... a bug'
    ("group_amsgrad", r"amsgrad is True there, False in this run"),  # hp20: 'unexpected KeyError max_exp_avg_sq'
    ("group_maximize", r"maximize is True there"),  # hp20: silently maximised the entropy
    ("group_extra", None),  # hp21 F5: a key another torch version writes (or lacks) is no damage
    ("group_lacking", None),
])
def test_a_damaged_checkpoint_of_this_run_is_refused_before_it_is_used(tmp_path, damage, needle):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    base, fts, files = _setup(tmp_path)
    ck = tmp_path / "ck.safetensors"
    tiesmerge.adapt(base, fts, files, forward=_forward(), steps=2, checkpoint=ck)
    with safe_open(str(ck), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if damage == "nan":
        tensors["adam.exp_avg"] = torch.full_like(tensors["adam.exp_avg"], float("nan"))
    elif damage == "shape":
        tensors["adam.exp_avg"] = torch.zeros(3)
    elif damage == "step":
        meta["step"] = "-5"
    elif damage.startswith("adam_step_"):
        tensors["adam.step"] = torch.full_like(tensors["adam.step"], float(damage.removeprefix("adam_step_")))
    elif damage.startswith("group_"):
        groups = _json.loads(meta["adam_param_groups"])
        key = damage.removeprefix("group_")
        if key == "extra":
            groups[0]["a_future_setting"] = None
        elif key == "lacking":
            del groups[0]["foreach"]
        else:
            groups[0][key] = {"lr": 1e30, "betas": [1, 1], "amsgrad": True, "maximize": True}[key]
        meta["adam_param_groups"] = _json.dumps(groups)
    elif damage == "huge":
        tensors["coefficients"] = torch.full_like(tensors["coefficients"], 1e30)
    else:
        meta["entropy"] = _json.dumps([[1.0]])
    save_file(tensors, str(ck), metadata=meta)
    if needle is None:  # resumes
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=4, checkpoint=ck, resume=True)
        return
    with pytest.raises(ConfigError, match=needle):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=4, checkpoint=ck, resume=True)


def _checkpointed(tmp_path, steps):
    """The small adapt setup, run ``steps`` steps with a checkpoint: (base, models, data files, checkpoint)."""
    base, fts, files = _setup(tmp_path)
    ck = tmp_path / "ck.safetensors"
    tiesmerge.adapt(base, fts, files, forward=_forward(), steps=steps, checkpoint=ck)
    return base, fts, files, ck


def test_resuming_a_checkpoint_past_the_runs_steps_says_which_result_it_writes(tmp_path):
    """hp21 N11: --resume --steps 3 from a checkpoint at step 300 wrote the 300-step result without a word."""
    from tiesmerge.errors import MergeWarning

    base, fts, files, ck = _checkpointed(tmp_path, steps=4)
    with pytest.warns(MergeWarning, match=r"the checkpoint is at step 4, past --steps 2: the result is the 4-step one"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=2, checkpoint=ck, resume=True)


def test_resuming_another_runs_checkpoint_names_the_settings_that_differ(tmp_path):
    """hp22 N3: --resume with --lr (or --init, --clamp, ...) changed was refused without saying which setting."""
    base, fts, files, ck = _checkpointed(tmp_path, steps=2)
    with pytest.raises(ConfigError, match=r"another run \(--lr 0\.001 there, 0\.002 now\)"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=4, checkpoint=ck, resume=True, lr=0.002)
    # the method is named too, since hp39 C24 (it said "other models, data, method or forward settings")
    with pytest.raises(ConfigError, match=r"another run \(the method `--method task_arithmetic` \(its defaults\) "
                                          r"there, `--method ties` \(its defaults\) now\)"):
        tiesmerge.adapt(base, fts, files, "ties", forward=_forward(), steps=4, checkpoint=ck, resume=True)


def test_task_vectors_that_are_all_zero_are_named_as_the_stuck_gradients_cause(tmp_path):
    """hp63b c33: a density that keeps no entry made every task vector zero; the first warning said "check the
    models' logits (huge weights) or start from another --init", advice that cannot help."""
    from tiesmerge.errors import MergeWarning

    base, fts, files = _setup(tmp_path)
    with pytest.warns(MergeWarning, match="every task vector the method hands AdaMerging is zero") as caught:
        tiesmerge.adapt(base, fts, files, "ties", forward=_forward(), steps=2, density=1e-9)
    assert not any("check the models' logits" in str(w.message) for w in caught)
