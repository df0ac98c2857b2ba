"""AdaMerging (tiesmerge.adapt): gradients of the coefficients against finite differences, fixed
coefficients against task arithmetic and TIES, the entropy going down, resume, bad inputs, the
written output, and the CLI on a tiny BERT classifier."""

from __future__ import annotations

import json

import pytest
import torch

import tiesmerge
from tiesmerge.adamerging import Merger, collect_task_vectors, total_entropy
from tiesmerge.adamerging.learn import batch_rows
from tiesmerge.errors import ConfigError, TrainingError
from tiesmerge.evaluation.forward import FunctionLogits
from tiesmerge.methods import TaskArithmetic, Ties


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _family(n: int = 2, scale: float = 0.6):
    """A base state dict and ``n`` fine-tunes (base + a random task vector each)."""
    base = {k: v.detach().clone() for k, v in _net().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    return base, [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


def _encode(rows, task):
    return torch.tensor([r["x"] for r in rows], dtype=torch.float32)


def _forward(dtype=torch.float32) -> FunctionLogits:
    return FunctionLogits(_net().to(dtype), lambda m, b, task: m(b.to(m[0].weight.device, dtype)), encode=_encode)


def _rows(seed: int, n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"text": f"example {i}", "x": torch.randn(4, generator=g).tolist()} for i in range(n)]


def _data(n_tasks: int = 2) -> list[list[dict]]:
    return [_rows(10 + t) for t in range(n_tasks)]


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_coefficient_gradients_match_finite_differences(granularity):
    base, fts = _family()
    tv = collect_task_vectors(base, fts, Ties(density=0.5))
    fwd = _forward(torch.float64)
    merger = Merger({n: tv.base[n].double() for n in tv.names}, {n: v.double() for n, v in tv.vectors.items()},
                    tv.names, granularity)
    batches = {f"t{t}": _encode(rows[:6], f"t{t}") for t, rows in enumerate(_data())}
    g = torch.Generator().manual_seed(3)
    lam = (0.3 + 0.2 * torch.rand(merger.shape, generator=g, dtype=torch.float64)).requires_grad_()
    assert merger.shape == (2, 1 if granularity == "task" else 4)
    assert torch.autograd.gradcheck(lambda c: total_entropy(fwd, merger, c, batches), (lam,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("method, reference", [
    (TaskArithmetic(), TaskArithmetic(lam=1.0, weights=(0.3, 0.3))),  # AdaMerging at its start: lam_t = 0.3
    (Ties(density=0.4), Ties(density=0.4, aggregate="sum", lam=0.3)),  # AdaMerging++: TIES's disjoint sum
])
def test_fixed_coefficients_reproduce_the_method(method, reference):
    base, fts = _family()
    result = tiesmerge.adapt(base, fts, _data(), method, forward=_forward(), granularity="task", steps=0)
    expected = tiesmerge.merge(base, fts, reference)
    for name, value in expected.items():
        torch.testing.assert_close(result.output[name], value, rtol=0, atol=1e-6)
    assert torch.equal(result.coefficients, torch.full((2, 1), 0.3)) and result.history.entropy == []


def test_one_coefficient_per_task_is_task_arithmetic_with_those_weights():
    base, fts = _family(3)
    tv = collect_task_vectors(base, fts, TaskArithmetic())
    merger = Merger(tv.base, tv.vectors, tv.names, "task")
    lam = torch.tensor([[0.7], [-0.2], [1.3]])
    merged = merger.params(lam)
    expected = tiesmerge.merge(base, fts, TaskArithmetic(lam=1.0, weights=(0.7, -0.2, 1.3)))
    for name in tv.names:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_a_run_lowers_the_entropy(granularity):
    base, fts = _family()
    data = _data()
    fwd = _forward()
    result = tiesmerge.adapt(base, fts, data, "ties", forward=fwd, granularity=granularity, steps=25, lr=0.05,
                             batch_size=8, density=0.5)
    # the merged model's entropy on all the data: the learned coefficients' against the starting ones'
    batches = {f"task{t}": _encode(rows, "") for t, rows in enumerate(data)}
    tv = collect_task_vectors(base, fts, Ties(density=0.5))
    merger = Merger(tv.base, tv.vectors, tv.names, granularity)
    with torch.no_grad():
        before = total_entropy(fwd, merger, torch.full(merger.shape, 0.3), batches)
        after = total_entropy(fwd, merger, result.coefficients, batches)
    assert float(after) < 0.9 * float(before)
    curve = result.history.mean()
    assert len(curve) == 25 and sum(curve[-5:]) < sum(curve[:5])
    assert not torch.equal(result.coefficients, torch.full(merger.shape, 0.3))


def test_batches_are_a_function_of_seed_task_and_step():
    rows = list(range(10))
    first = [batch_rows(rows, s, 4, 0, 1) for s in range(5)]  # 20 positions: two full passes
    assert sorted(sum(first[:2], []) + first[2][:2]) == rows  # a pass is a permutation
    assert first == [batch_rows(rows, s, 4, 0, 1) for s in range(5)]
    assert first != [batch_rows(rows, s, 4, 1, 1) for s in range(5)]


def test_resume_continues_identically(tmp_path):
    base, fts = _family()
    kwargs = dict(forward=_forward(), granularity="layer", lr=0.05, batch_size=5, checkpoint_every=2)
    straight = tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=8, checkpoint=tmp_path / "a.pt", **kwargs)
    half = tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=5, checkpoint=tmp_path / "b.pt", **kwargs)
    assert len(half.history.entropy) == 5
    resumed = tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=8, checkpoint=tmp_path / "b.pt",
                              resume=True, **kwargs)
    assert torch.equal(resumed.coefficients, straight.coefficients)
    assert resumed.history.entropy == straight.history.entropy
    for name, value in straight.output.items():
        assert torch.equal(resumed.output[name], value)
    with pytest.raises(ConfigError, match="b.pt: this checkpoint is of another run"):
        tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=9, checkpoint=tmp_path / "b.pt", resume=True,
                        **{**kwargs, "lr": 0.01})


def test_bad_inputs_name_what_is_wrong(tmp_path):
    base, fts = _family()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ConfigError, match="empty.jsonl: the data file holds no examples"):
        tiesmerge.adapt(base, fts, [good, empty], forward=_forward(), steps=1)
    with pytest.raises(ConfigError, match="3 data file.s. for 2 model"):
        tiesmerge.adapt(base, fts, _data(3), forward=_forward(), steps=1)
    with pytest.raises(ConfigError, match="task 'task1': no examples"):
        tiesmerge.adapt(base, fts, [_rows(1), []], forward=_forward(), steps=1)
    nan = FunctionLogits(_net(), lambda m, b, task: m(b) * (float("nan") if task == "b" else 1.0), encode=_encode)
    with pytest.raises(TrainingError, match="entropy of task 'b' at step 0 is nan"):
        tiesmerge.adapt(base, fts, _data(), forward=nan, tasks=["a", "b"], steps=3)
    with pytest.raises(ConfigError, match="unknown forward kind 'vision'"):
        tiesmerge.adapt(tmp_path, fts, _data(), forward="vision", steps=1)
    with pytest.raises(ConfigError, match="method 'slerp' does not expose per-task vectors"):
        tiesmerge.adapt(base, fts, _data(), "slerp", forward=_forward(), steps=1)
    with pytest.raises(ConfigError, match="granularity='block' is not one of task, layer"):
        tiesmerge.adapt(base, fts, _data(), forward=_forward(), granularity="block")
    renamed = FunctionLogits(torch.nn.Sequential(torch.nn.Identity(), _net()), lambda m, b, t: m(b), encode=_encode)
    with pytest.raises(ConfigError, match="merged tensors are not weights of the forward's model"):
        tiesmerge.adapt(base, fts, _data(), forward=renamed, steps=1)


def test_adapt_cli_on_a_bert_classifier(classifiers, tmp_path, capsys):
    from tiesmerge.cli.main import main

    root, base, fts, data = classifiers
    files = []
    for k in range(2):
        path = tmp_path / f"task{k}.jsonl"
        path.write_text(data.read_text())
        files.append(path)
    argv = ["adapt", "--base", str(base), *sum((["--model", str(f)] for f in fts), []),
            *sum((["--data", str(f)] for f in files), []), "--method", "ties", "--density", "0.5",
            "--steps", "4", "--batch-size", "2", "--lr", "0.01"]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "coefficients     2 x " in out and "task vectors" in out and "memory" in out
    assert main([*argv, "-o", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "adapted 2 models (ties:density=0.5, layer-wise" in out and "task0: coefficients mean" in out
    merged = tmp_path / "merged"
    manifest = json.loads((merged / "tiesmerge.json").read_text())
    assert manifest["method"]["name"] == "adamerging" and manifest["adamerging"]["tasks"] == ["task0", "task1"]
    coefficients = json.loads((merged / "adamerging_coefficients.json").read_text())
    assert len(coefficients["values"]) == 2 and len(coefficients["values"][0]) == len(coefficients["layers"]) > 10
    assert len(json.loads((merged / "adamerging_entropy.json").read_text())["mean"]) == 4
    # the report files were written inside the atomic output, so its listing names them (--force relies on it)
    assert {"adamerging_coefficients.json", "adamerging_entropy.json"} <= set(manifest["written"])
    assert (tmp_path / "merged.adapt-checkpoint.safetensors").is_file()
    if pytest.importorskip("matplotlib"):
        assert (merged / "adamerging_coefficients.png").is_file() and (merged / "adamerging_entropy.png").is_file()
    # the written model is the learned merge: the coefficients applied to TIES's vectors
    tv = collect_task_vectors(base, fts, Ties(density=0.5))
    lam = torch.tensor(coefficients["values"])
    expected = Merger(tv.base, tv.vectors, tv.names, "layer").params(lam)
    got = tiesmerge.open_checkpoint(merged)
    for name in tv.names:
        torch.testing.assert_close(got.read(name), expected[name], rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapt_on_cuda_matches_the_cpu():
    base, fts = _family()
    kwargs = dict(granularity="layer", steps=5, lr=0.05, batch_size=8)
    cpu = tiesmerge.adapt(base, fts, _data(), "ties", forward=_forward(), density=0.5, **kwargs)
    gpu = tiesmerge.adapt(base, fts, _data(), "ties", forward=_forward(), density=0.5, device="cuda", **kwargs)
    torch.testing.assert_close(gpu.coefficients, cpu.coefficients, rtol=1e-4, atol=1e-5)
    for name, value in cpu.output.items():
        torch.testing.assert_close(gpu.output[name].cpu(), value, rtol=1e-4, atol=1e-5)


def test_tsv_m_per_task_components_sum_to_its_merge():
    """TSV-M's task_vectors: each task's triplets in the decorrelated bases (and tau_t / T where it averages), so
    that lam times their sum is the merge; adapt over them at init lam, 0 steps, is TSV-M at lam."""
    from tiesmerge.methods import TsvMerge

    base, fts = _family(3)
    tv = collect_task_vectors(base, fts, TsvMerge())
    merged = tiesmerge.merge(base, fts, TsvMerge(lam=1.0))
    for name in tv.names:
        torch.testing.assert_close(base[name] + tv.vectors[name].sum(0), merged[name], rtol=0, atol=1e-5)
    assert tv.vectors["0.weight"].shape == (3, 8, 4) and torch.linalg.matrix_rank(tv.vectors["0.weight"][0]) == 1
    result = tiesmerge.adapt(base, fts, _data(3), "tsv_m", forward=_forward(), granularity="task", steps=0, init=1.3)
    expected = tiesmerge.merge(base, fts, TsvMerge(lam=1.3))
    for name, value in expected.items():
        torch.testing.assert_close(result.output[name], value, rtol=0, atol=1e-5)


def _labelled(seed: int, teacher: dict, n: int = 24) -> list[dict]:
    """Rows labelled by a fine-tuned model's own predictions: the task the merge should keep."""
    net = _net()
    net.load_state_dict(teacher)
    rows = _rows(seed, n)
    with torch.no_grad():
        labels = net(torch.tensor([r["x"] for r in rows])).argmax(1).tolist()
    return [{**r, "label": y} for r, y in zip(rows, labels)]


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_the_cross_entropy_objective_learns_from_labels(granularity):
    base, fts = _family()
    data = [_labelled(20 + t, ft) for t, ft in enumerate(fts)]
    fwd = _forward()
    result = tiesmerge.adapt(base, fts, data, "task_arithmetic", forward=fwd, granularity=granularity, steps=30,
                             lr=0.05, batch_size=8, objective="cross_entropy")
    tv = collect_task_vectors(base, fts, TaskArithmetic())
    merger = Merger(tv.base, tv.vectors, tv.names, granularity)

    def loss(lam):
        total = 0.0
        params = merger.params(lam)
        for rows in data:
            net = _net()
            net.load_state_dict({k: params[k].detach() for k in net.state_dict()})
            with torch.no_grad():
                logits = net(_encode(rows, ""))
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor([r["label"] for r in rows])))
        return total

    assert loss(result.coefficients) < 0.9 * loss(torch.full(merger.shape, 0.3))
    curve = result.history.mean()
    assert len(curve) == 30 and sum(curve[-5:]) < sum(curve[:5])


def test_the_cross_entropy_objective_names_a_missing_or_foreign_label():
    base, fts = _family()
    data = [_labelled(20 + t, ft) for t, ft in enumerate(fts)]
    data[1][4] = {k: v for k, v in data[1][4].items() if k != "label"}
    with pytest.raises(ConfigError, match=r"task 'task1': example 5 has no class index as its 'label'"):
        tiesmerge.adapt(base, fts, data, forward=_forward(), steps=2, objective="cross_entropy")
    data[1][4] = {**data[1][4], "label": 2**64}  # past what a tensor holds (pass 18 F1: an untyped overflow)
    with pytest.raises(ConfigError, match=r"example 5's 'label' 18446744073709551616 is past any class index"):
        tiesmerge.adapt(base, fts, data, forward=_forward(), steps=2, objective="cross_entropy")  # (hp63b c34)
    data[1][4] = {**data[1][4], "label": 7}  # 3 classes: found before the first step (its example named: hp68b c30)
    with pytest.raises(ConfigError, match="task 'task1': example 5's label 7 is past the model's 3 classes"):
        tiesmerge.adapt(base, fts, data, forward=_forward(), steps=2, batch_size=1, objective="cross_entropy")
    with pytest.raises(ConfigError, match="objective='hinge' is not one of entropy, cross_entropy"):
        tiesmerge.adapt(base, fts, data, forward=_forward(), steps=2, objective="hinge")


def test_a_label_problem_in_a_data_file_names_the_file(tmp_path):
    """hp22 N2: with --task-names the error said "task 't1': example 4", not the file the row is in."""
    base, fts = _family()
    files = []
    for t, ft in enumerate(fts):
        rows = _labelled(20 + t, ft)
        if t == 1:
            rows[3] = {k: v for k, v in rows[3].items() if k != "label"}
        files.append(tmp_path / f"d{t}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"d1\.jsonl: example 4 has no class index"):
        tiesmerge.adapt(base, fts, files, tasks=["t0", "t1"], forward=_forward(), steps=2,
                        objective="cross_entropy")
    rows[3] = {**rows[1], "label": 7}  # past the model's 3 classes (hp68b c30: "task 't1': label 7", no file)
    files[1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"d1\.jsonl: example 4's label 7 is past the model's 3 classes"):
        tiesmerge.adapt(base, fts, files, tasks=["t0", "t1"], forward=_forward(), steps=2,
                        objective="cross_entropy")
    for tasks, said in ((["x", "x"], "two tasks are named 'x' \\(the names given\\)"),
                        (None, "two tasks are named 'd' \\(their data files' names\\)")):  # hp68b c41
        named = files if tasks else [tmp_path / "a" / "d.jsonl", tmp_path / "b" / "d.jsonl"]
        for f, g in zip(named, files):
            f.parent.mkdir(exist_ok=True)
            if f != g:
                f.write_text(g.read_text())
        with pytest.raises(ConfigError, match=said):
            tiesmerge.adapt(base, fts, named, tasks=tasks, forward=_forward(), steps=2)
