"""Per-model statistics beside the models (engine/side.py): statistics that do not fit their
models, or the method, give typed errors."""

from __future__ import annotations

import pytest
import torch

from helpers_ckpt import make_family
from helpers_merge import fisher_stats, float_names, gram_stats, merge
from tiesmerge.errors import ConfigError, IncompatibleCheckpointsError, InvalidTensorError
from tiesmerge.methods import Fisher, RegMean
from tiesmerge.stats import save_stats


def test_statistics_that_do_not_fit_give_typed_errors(tmp_path):
    base, models = make_family(2)
    names = float_names(base)
    good = {n: torch.rand(base[n].shape) for n in names}
    wrong_shape = {**good, "model.norm.weight": torch.rand(9)}
    with pytest.raises(IncompatibleCheckpointsError, match=r"'model.norm.weight' is \(9,\).*\(8,\)"):
        merge(base, models, Fisher(), [fisher_stats(good), fisher_stats(wrong_shape)])
    save_stats(tmp_path / "extra", fisher_stats({**good, "model.layers.9.mlp.up_proj.weight": torch.rand(16, 8)}))
    with pytest.raises(IncompatibleCheckpointsError, match=r"extra.*'model.layers.9.mlp.up_proj.weight'.*not a tensor"):
        merge(base, models, Fisher(), [fisher_stats(good), str(tmp_path / "extra")])
    with pytest.raises(IncompatibleCheckpointsError, match="no statistic for any tensor"):
        merge(base, models, Fisher(), [fisher_stats(good), fisher_stats({})])
    with pytest.raises(IncompatibleCheckpointsError, match="only 2-D weights have Gram"):
        merge(base, models, RegMean(), [gram_stats({"model.norm.weight": torch.eye(8)})] * 2)
    with pytest.raises(IncompatibleCheckpointsError, match=r"is \(16, 16\).*takes a gram statistic of shape \(8, 8\)"):
        merge(base, models, RegMean(), [gram_stats({"model.layers.0.mlp.up_proj.weight": torch.eye(16)})] * 2)
    with pytest.raises(IncompatibleCheckpointsError, match="1 statistics given for 2 models"):
        merge(base, models, Fisher(), [fisher_stats(good)])
    with pytest.raises(ConfigError, match="holds gram statistics, but the method needs fisher"):
        merge(base, models, Fisher(), [gram_stats(good)] * 2)
    with pytest.raises(ConfigError, match="needs fisher statistics of every model"):
        merge(base, models, Fisher(), None)
    with pytest.raises(ConfigError, match="does not use them"):
        merge(base, models, "ties", [fisher_stats(good)] * 2)
    negative = {**good, "lm_head.weight": -torch.rand(32, 8)}
    with pytest.raises(InvalidTensorError, match="negative"):
        merge(base, models, Fisher(), [fisher_stats(good), fisher_stats(negative)])
