"""Statistics directories (stats/files.py): the round trip, and typed errors for files that do not fit."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_ckpt import assert_no_output
from helpers_models import batches, data, logits, tiny_classifier
from tiesmerge.errors import CheckpointError, ConfigError
from tiesmerge.stats import (
    MANIFEST_NAME,
    Statistics,
    StatsManifest,
    fisher_information,
    load_stats,
    open_stats,
    save_stats,
)


def test_statistics_round_trip(tmp_path):
    model, (x, y) = tiny_classifier(), data()
    stats = fisher_information(model, batches(x, y, 5), logits)
    out = save_stats(tmp_path / "fisher", stats)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "fisher" and manifest["examples"] == 10
    assert manifest["options"]["kind"] == "exact" and manifest["model_digest"].startswith("tensors:")
    back = load_stats(out)
    assert back.manifest.kind == "fisher" and back.manifest.model_digest == stats.manifest.model_digest
    assert set(back.tensors) == set(stats.tensors)
    for name, value in stats.tensors.items():
        assert torch.equal(back.tensors[name], value)
    with pytest.raises(Exception, match="not empty"):
        save_stats(out, stats)  # never overwritten silently
    save_stats(out, stats, force=True)


def test_statistics_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a statistics directory"):
        open_stats(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match=MANIFEST_NAME):
        open_stats(tmp_path / "plain")
    gram = Statistics(StatsManifest("gram", 3), {"0.weight": torch.eye(4)})
    save_stats(tmp_path / "gram", gram)
    with pytest.raises(ConfigError, match="holds gram statistics, but the method needs fisher"):
        open_stats(tmp_path / "gram", kind="fisher")
    (tmp_path / "gram" / MANIFEST_NAME).write_text('{"kind": "hessian", "examples": 1}')
    with pytest.raises(CheckpointError, match="not a tiesmerge statistics manifest"):
        open_stats(tmp_path / "gram")
    with pytest.raises(ConfigError, match="not a floating"):
        save_stats(tmp_path / "ints", Statistics(StatsManifest("gram", 1), {"a": torch.ones(2, dtype=torch.int64)}))
    assert_no_output(tmp_path / "ints")
