"""The freeze policy: what --freeze stops from training, and the optimizer groups it leaves."""

from __future__ import annotations

from tlreg.training.examples.digits import upper
from tlreg.training.freeze import apply_freeze, matches_any


def test_freeze_stops_exactly_the_matching_parameters_and_names_them() -> None:
    model = upper.build_model(0)
    frozen = apply_freeze(model, ["features.*"])
    names = [n for n, _ in model.named_parameters()]
    assert frozen == [n for n in names if n.startswith("features.")] and frozen
    for name, param in model.named_parameters():
        assert param.requires_grad == (name not in frozen)
    assert apply_freeze(model, []) == []  # an empty policy trains everything again
    assert all(p.requires_grad for p in model.parameters())


def test_globs_match_whole_names_case_sensitively() -> None:
    assert matches_any("encoder.layer.3.w", ["encoder.layer.[0-3].*"])
    assert not matches_any("encoder.layer.4.w", ["encoder.layer.[0-3].*"])
    assert not matches_any("Head.weight", ["head.*"])
    assert not matches_any("x.head.weight", ["head.*"])
    assert not matches_any("anything", [])
