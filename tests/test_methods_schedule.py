"""Per-tensor option values (methods/schedule.py): mergekit's filters, gradients and layer positions."""

from __future__ import annotations

import pytest

from tiesmerge.methods.schedule import gradient_value, layer_index, parse_schedule, position, schedule_problem


def test_parse_and_evaluate_like_mergekit() -> None:
    s = parse_schedule("self_attn=0,0.5,0.3,0.7,1; mlp=1,0.5,0.7,0.3,0; *=0.5")
    assert s.rules[0] == ("self_attn", (0.0, 0.5, 0.3, 0.7, 1.0)) and s.rules[2] == (None, (0.5,))
    # 4 layers: layer i at i / 3; value at scaled = t * 4, linear between neighbours
    assert s.value("model.layers.0.self_attn.q_proj.weight", 4, 9.0) == 0.0
    assert s.value("model.layers.3.self_attn.q_proj.weight", 4, 9.0) == 1.0
    assert s.value("model.layers.1.self_attn.q_proj.weight", 4, 9.0) == pytest.approx(
        (1 - (4 / 3 - 1)) * 0.5 + (4 / 3 - 1) * 0.3)
    assert s.value("model.layers.2.mlp.up_proj.weight", 4, 9.0) == gradient_value((1, 0.5, 0.7, 0.3, 0), 2 / 3)
    assert s.value("model.embed_tokens.weight", 4, 9.0) == 0.5  # the catch-all
    assert parse_schedule("self_attn=0.1").value("lm_head.weight", 4, 9.0) == 9.0  # no rule: the default
    assert parse_schedule("0,1").rules == ((None, (0.0, 1.0)),)  # a bare gradient applies to every tensor


def test_positions_follow_mergekits_planner() -> None:
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("bert.encoder.layer.7.output.dense.weight") == 7
    assert layer_index("model.embed_tokens.weight") is None
    assert position("model.layers.2.x", 5) == 0.5
    assert position("model.layers.0.x", 1) == 1.0  # one layer: mergekit's t = 1
    assert position("lm_head.weight", 5) == 0.0  # outside the layers: t = 0


def test_malformed_schedules_say_why() -> None:
    assert schedule_problem("self_attn=zero") and "numbers" in schedule_problem("self_attn=zero")
    assert schedule_problem(";;") and "no rule" in schedule_problem(";;")
    assert schedule_problem(3) is not None
    assert schedule_problem("a=1;*=0.5") is None
