"""The method table (registry.py): names to the same method configs."""

from __future__ import annotations

import torch

import tiesmerge
from helpers_merge import grid_family, run
from tiesmerge.methods import Ties


def test_registry_names_build_the_same_methods() -> None:
    assert tiesmerge.METHODS["ties"] is Ties
    base, models = grid_family(14, 2)
    a = run(base, models, "ties", density=0.4, lam=1.1)
    b = run(base, models, Ties(density=0.4, lam=1.1))
    assert all(torch.equal(a[k], b[k]) for k in a)
