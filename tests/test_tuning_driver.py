"""The search loop in one process (tuning/driver.py, executors.LocalExecutor, results_log.py,
report.py): the grid matches `tune`, merges are shared between candidates, an interrupted search
resumes from its JSONL log without re-scoring, and the report is written."""

from __future__ import annotations

import json

import pytest
import torch

import tiesmerge
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Ties
from tiesmerge.tuning import candidates, run_search, tune, write_report


def _states():
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(12, 10, generator=g), "layer.bias": torch.randn(10, generator=g),
            "position_ids": torch.arange(7)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
               for k, v in base.items()} for _ in range(3)]
    return base, models


class Distance:
    """Minus the squared distance to a target merge: highest (0) exactly there."""

    def __init__(self, target):
        self.target = target
        self.calls = 0

    def __call__(self, state):
        self.calls += 1
        return -sum(float(((state[k].float() - self.target[k].float()) ** 2).sum()) for k in self.target)


class Interrupt(Exception):
    pass


@pytest.fixture
def family():
    base, models = _states()
    return base, models, Distance(tiesmerge.merge(base, models, Ties(density=0.2, lam=1.7)))


@pytest.fixture
def merges(monkeypatch):
    calls = []
    real = candidates.merged_delta

    def counting(job, base32, options, **kwargs):
        calls.append(dict(options))
        return real(job, base32, options, **kwargs)

    monkeypatch.setattr(candidates, "merged_delta", counting)
    monkeypatch.setattr("tiesmerge.tuning.executors.merged_delta", counting)
    return calls


def test_grid_search_matches_tune(family, merges):
    base, models, score = family
    result = run_search(base, models, "ties", score)
    reference = tune(base, models, "ties", score)
    assert [(t.options, t.score) for t in result.trials] == \
        [({**p.options, "lam": p.lam}, p.score) for p in reference.points]
    assert result.best.options == {"density": 0.2, "lam": 1.7} and result.best.index == 32
    assert result.merges == 3 == len(merges) and result.evaluations == 69  # lam shares each merge
    assert [o["density"] for o in merges] == [0.1, 0.2, 0.3]
    for k in base:
        torch.testing.assert_close(result.best_state[k], reference.best_state[k], rtol=0, atol=0)
        assert result.best_state[k].dtype == base[k].dtype


def test_per_model_candidates_merge_with_their_options(family):
    base, models, score = family
    seen = []
    result = run_search(base, models, "ties", lambda s: seen.append(s) or score(s), strategy="random", budget=4,
                        axes=("densities", "weights", "lam"), fixed={"scope": "per_tensor"})
    assert result.merges == 4 and len(result.trials) == 4
    for trial, state in zip(result.trials, seen, strict=True):
        assert trial.options["scope"] == "per_tensor" and len(trial.options["densities"]) == 3
        expected = tiesmerge.merge(base, models, Ties(**trial.options))
        for k in base:
            torch.testing.assert_close(state[k], expected[k], rtol=1e-6, atol=4e-6)


def test_a_bad_candidate_fails_before_any_merge(family, merges):
    base, models, score = family
    with pytest.raises(ConfigError, match="density"):
        run_search(base, models, "ties", score, grid={"density": (0.2, 1.5)})
    with pytest.raises(ConfigError, match=r"gives 2 value\(s\) for 3 models"):
        run_search(base, models, "ties", score, fixed={"weights": (1.0, 2.0)})
    assert merges == [] and score.calls == 0


def test_duplicates_are_scored_once(family):
    base, models, score = family
    result = run_search(base, models, "ties", score, grid={"density": (0.2, 0.2), "lam": (1.0, 1.0)})
    assert score.calls == 1 and len(result.trials) == 4 and result.evaluations == 1
    assert len({t.score for t in result.trials}) == 1 and result.best.index == 0


def test_interrupted_search_resumes_without_rescoring(family, tmp_path):
    base, models, score = family
    log = tmp_path / "log.jsonl"
    full = run_search(base, models, "ties", score, strategy="cmaes", budget=30, axes=("densities", "lam"), seed=2)

    def stop_after_11(trial):
        if trial.index == 10:
            raise Interrupt

    first = Distance(score.target)
    with pytest.raises(Interrupt):
        run_search(base, models, "ties", first, strategy="cmaes", budget=30, axes=("densities", "lam"), seed=2,
                   log=str(log), on_trial=stop_after_11)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 11 and json.loads(lines[0])["strategy"] == "cmaes"
    log.write_text(log.read_text() + '{"key": "cut mid-wri')  # a line cut by the interruption is dropped
    second = Distance(score.target)
    resumed = run_search(base, models, "ties", second, strategy="cmaes", budget=30, axes=("densities", "lam"),
                         seed=2, log=str(log))
    # nothing scored twice but the first logged candidate and the best, scored again to check the log (their scores
    # kept from there); the best of these 11 is not the first
    scores = [json.loads(line)["score"] for line in lines[1:]]
    assert max(scores) != scores[0]
    assert second.calls == 30 - 11 + 2 == resumed.evaluations and resumed.log_checked == 2
    assert [t.reused for t in resumed.trials] == [True] * 11 + [False] * 19
    assert [(t.options, t.score) for t in resumed.trials] == [(t.options, t.score) for t in full.trials]
    assert resumed.best.options == full.best.options
    for k in base:
        torch.testing.assert_close(resumed.best_state[k], full.best_state[k], rtol=0, atol=0)
    # done: a third run scores only the candidates that check the log, and the log has every candidate once
    third = Distance(score.target)
    again = run_search(base, models, "ties", third, strategy="cmaes", budget=30, axes=("densities", "lam"), seed=2,
                       log=str(log))
    assert third.calls == 2 and again.evaluations == 2 and all(t.reused for t in again.trials)
    assert again.best.options == resumed.best.options
    assert len(log.read_text().splitlines()) == 1 + 30


def test_the_log_of_another_search_is_refused(family, tmp_path):
    base, models, score = family
    log = tmp_path / "log.jsonl"
    run_search(base, models, "ties", score, strategy="random", budget=2, axes=("density", "lam"), log=str(log))
    with pytest.raises(ConfigError, match="another search.*seed"):
        run_search(base, models, "ties", score, strategy="random", budget=2, axes=("density", "lam"), seed=1,
                   log=str(log))
    log.write_text(log.read_text() + "not json\n")
    with pytest.raises(ConfigError, match="not a scored candidate"):
        run_search(base, models, "ties", score, strategy="random", budget=2, axes=("density", "lam"), log=str(log))


def test_report(family, tmp_path):
    base, models, score = family
    result = run_search(base, models, "ties", score, strategy="random", budget=6, axes=("densities", "lam"))
    page = write_report(result, tmp_path / "r")
    text = page.read_text()
    assert page.name == "report.html" and text.count("data:image/png;base64,") == 2
    md = (tmp_path / "r" / "results.md").read_text()
    assert f"Best: candidate {result.best.index}" in md and md.count("\n| ") == 1 + 6
    assert "**best**" in md and "densities" in md


def test_a_method_without_lam_scores_each_merge_as_it_is(family):
    base, models, _ = family
    seen = []
    result = run_search(base, models[:2], "slerp", lambda s: seen.append(s) or 0.0, axes=("t",),
                        grid={"t": (0.25, 0.5)})
    assert result.merges == 2 and [t.options for t in result.trials] == [{"t": 0.25}, {"t": 0.5}]
    for trial, state in zip(result.trials, seen, strict=True):
        expected = tiesmerge.merge(base, models[:2], "slerp", t=trial.options["t"])
        for k in base:
            assert torch.equal(state[k], expected[k]) and state[k].dtype == base[k].dtype
