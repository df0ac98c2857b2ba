"""The search on Ray (tuning/executors.RayExecutor) against the same search in one process, on a
local cluster of 2 CPUs started once for the module: the same candidates and scores, a worker
killed mid-evaluation retried with the result unchanged, an interrupted search resumed without
re-scoring. Skipped where ray is not installed (the [distributed] extra)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tiesmerge
from tiesmerge.methods import Ties
from tiesmerge.tuning import LocalExecutor, RayExecutor, run_search

ray = pytest.importorskip("ray")

GRID = {"density": (0.1, 0.2, 0.3), "lam": (0.8, 1.0, 1.2, 1.5, 1.7, 2.0, 2.5, 3.0)}  # 24 points, 3 merges


def _states():
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(12, 10, generator=g), "layer.bias": torch.randn(10, generator=g),
            "position_ids": torch.arange(7)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
               for k, v in base.items()} for _ in range(3)]
    return base, models


class Distance:
    """Minus the squared distance to a target merge; each call appends a line to ``calls`` (the
    workers are other processes: a file counts their calls). With ``die``: the first call, in a
    worker, kills its process (os._exit) after creating the marker file (atomically: two workers may
    start at once), so the retry lives."""

    def __init__(self, target, calls: Path, die: Path | None = None):
        self.target, self.calls, self.die = target, calls, die

    def __call__(self, state):
        with open(self.calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.die is not None:
            try:  # O_EXCL: of two workers starting at once, exactly one creates the marker and dies
                fd = os.open(self.die, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        return -sum(float(((state[k].float() - self.target[k].float()) ** 2).sum()) for k in self.target)


@pytest.fixture(scope="module")
def cluster():
    executor = RayExecutor(workers=2)  # one local cluster for the module: starting one costs seconds
    yield executor
    executor.close()


@pytest.fixture
def family(tmp_path):
    base, models = _states()
    target = tiesmerge.merge(base, models, Ties(density=0.2, lam=1.7))
    return base, models, lambda **kw: Distance(target, tmp_path / f"calls-{len(list(tmp_path.iterdir()))}", **kw)


def _calls(score: Distance) -> list[str]:
    return score.calls.read_text().splitlines() if score.calls.exists() else []


def _logged_best_is_first(log, logged: int) -> bool:
    """Whether the log's best score (the first of equal ones) is its first record's: a resume then checks one."""
    scores = [json.loads(line)["score"] for line in log.read_text().splitlines()[1:1 + logged]]
    return max(scores) == scores[0]


def _same(a, b):
    assert [(t.index, t.options, t.score) for t in a.trials] == [(t.index, t.options, t.score) for t in b.trials]
    assert (a.best.index, a.best.options, a.best.score) == (b.best.index, b.best.options, b.best.score)
    for k in a.best_state:
        assert torch.equal(a.best_state[k], b.best_state[k]) and a.best_state[k].dtype == b.best_state[k].dtype


def test_grid_on_ray_picks_the_same_candidate_with_the_same_scores(cluster, family):
    base, models, make = family
    local = run_search(base, models, "ties", make(), grid=GRID, executor=LocalExecutor())
    score = make()
    remote = run_search(base, models, "ties", score, grid=GRID, executor=cluster)
    _same(remote, local)
    assert remote.best.options == {"density": 0.2, "lam": 1.7} and remote.merges == 3
    assert cluster.gpus_per_task == (1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
    pids = set(_calls(score))
    assert len(_calls(score)) == 24 and os.getpid() not in {int(p) for p in pids}  # scored in the workers


def test_cmaes_on_ray_equals_in_process_for_the_same_seed(cluster, family):
    base, models, make = family
    kwargs = dict(strategy="cmaes", budget=16, seed=5, axes=("densities", "weights", "lam"), popsize=8)
    _same(run_search(base, models, "ties", make(), executor=cluster, **kwargs),
          run_search(base, models, "ties", make(), **kwargs))


def test_a_worker_killed_mid_evaluation_is_retried(cluster, family, tmp_path):
    base, models, make = family
    local = run_search(base, models, "ties", make(), grid={"density": (0.1, 0.2), "lam": (1.0, 1.7, 2.0)})
    marker = tmp_path / "died"
    score = make(die=marker)
    remote = run_search(base, models, "ties", score, grid={"density": (0.1, 0.2), "lam": (1.0, 1.7, 2.0)},
                        executor=cluster)
    assert marker.exists()  # a worker did die, in the middle of an evaluation
    assert len(_calls(score)) == 6 + 1  # the killed evaluation ran again
    _same(remote, local)


def test_an_interrupted_search_on_ray_resumes_without_rescoring(cluster, family, tmp_path):
    base, models, make = family
    log = tmp_path / "log.jsonl"
    full = run_search(base, models, "ties", make(), grid=GRID)

    def stop(trial):
        if len(log.read_text().splitlines()) > 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(base, models, "ties", make(), grid=GRID, executor=cluster, log=str(log), on_trial=stop)
    logged = len(log.read_text().splitlines()) - 1
    assert 8 <= logged < 24
    score = make()
    resumed = run_search(base, models, "ties", score, grid=GRID, executor=cluster, log=str(log))
    # nothing in the log is scored again but the first and the best, which check it (their scores kept from the log)
    checked = 1 if _logged_best_is_first(log, logged) else 2
    assert resumed.evaluations == 24 - logged + checked == len(_calls(score)) and resumed.log_checked == checked
    assert sum(t.reused for t in resumed.trials) == logged
    assert [(t.options, t.score) for t in resumed.trials] == [(t.options, t.score) for t in full.trials]
    assert (resumed.best.index, resumed.best.score) == (full.best.index, full.best.score)
    for k in full.best_state:
        assert torch.equal(resumed.best_state[k], full.best_state[k])


def _threads_score(state) -> float:
    """The evaluation's torch threads as its score: what each Ray task runs with."""
    return float(torch.get_num_threads())


def test_each_task_runs_with_its_cpus_as_torch_threads(cluster, family):
    base, models, _ = family
    assert cluster.workers * cluster.cpus_per_task <= max(2, os.cpu_count() or 1)
    result = run_search(base, models, "ties", _threads_score, grid={"density": (0.2,), "lam": (1.0, 2.0)},
                        executor=cluster)
    assert {t.score for t in result.trials} == {float(cluster.cpus_per_task)}


def test_workers_and_cpus_per_task_are_checked_before_ray_starts():
    from tiesmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 1"):
        RayExecutor(workers=0)
    with pytest.raises(ConfigError, match="joined cluster"):
        RayExecutor("auto", workers=2)


class _AlwaysDies:
    def __call__(self, state):
        os._exit(3)  # as the kernel's OOM killer or a crash in native code would end it: no exception to send back


def test_a_worker_that_dies_on_every_try_is_an_evaluator_error(cluster, family):
    """hostile pass 34, D8: Ray's WorkerCrashedError, after every retry, reached the CLI as "unexpected … this is a
    bug in tiesmerge", pointing at log files in the local cluster's folder (removed when the search ends)."""
    from tiesmerge.errors import EvaluatorError

    base, models, _make = family
    with pytest.raises(EvaluatorError) as caught:
        run_search(base, models, "ties", _AlwaysDies(), grid={"density": (0.2,), "lam": (1.0,)}, executor=cluster)
    message = str(caught.value)
    assert "_AlwaysDies" in message and "died on each of Ray's 4 tries (WorkerCrashedError)" in message
    assert "density=0.2, lam=1.0" in message and "without --ray" in message and ".log" not in message


def test_relative_model_paths_reach_workers_that_run_elsewhere(cluster, tmp_path, monkeypatch):
    """hostile pass 34, D68: on a cluster whose workers run in another folder (one started with `ray start --head`
    from /; here the module's cluster, started in pytest's folder, before this test changes folder), relative --base
    and --model paths were read against the worker's folder: "base: no such file or directory". They are made
    absolute in the driver."""
    from helpers_ckpt import write_family_dirs

    base, models = write_family_dirs(tmp_path)
    monkeypatch.chdir(tmp_path)
    grid = {"density": (0.2,), "lam": (1.0, 1.5)}
    relative = run_search(base.name, [m.name for m in models], "ties", _norm, grid=grid, executor=cluster)
    local = run_search(base, models, "ties", _norm, grid=grid)
    _same(relative, local)


def _norm(state) -> float:
    return -sum(float(v.float().square().sum()) for v in state.values())
