"""The one intervention-spec grammar (`eah_interp.interventions.parse`): every form, defaults, errors, round trip.

Expected values are built by calling the classes and presets directly, not through the parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from eah_interp.errors import ConfigError
from eah_interp.interventions import (
    ADHH,
    EAH,
    PAI,
    VAF,
    VAR,
    HeadScale,
    Intervention,
    Knockout,
    MiddleLayerBoost,
    ResidualEdit,
    SyntheticMap,
    ValueEdit,
    format_spec,
    parse,
    presets,
    register_preset,
)
from eah_interp.interventions import spec as spec_module


def test_none_is_the_plain_model():
    assert parse("none") == () and parse(" None ") == ()


def test_a_preset_a_call_and_a_stack():
    assert parse("eah") == (EAH.paper(),)
    assert parse("pai(alpha=0.5)") == (PAI(alpha=0.5),)
    assert parse("eah + pai(alpha=0.5, layers=[2, 3])") == (EAH.paper(), PAI(alpha=0.5, layers=(2, 3)))
    assert parse("eah-reference(layers=[2])") == (EAH.reference(layers=(2,)),)
    assert parse("var-llava15-7b") == (VAR.llava15_7b(),)


def test_names_ignore_case_dashes_and_underscores():
    expected = (MiddleLayerBoost(alpha=0.7),)
    for name in ("middle-layer-boost", "MiddleLayerBoost", "middle_layer_boost", "MIDDLELAYERBOOST"):
        assert parse(f"{name}(alpha=0.7)") == expected
    assert parse("EAH_reference") == (EAH.reference(),)


def test_literal_arguments_are_read_as_python_literals():
    items = parse("knockout(queries='last', keys=\"system\", layers=(0, 1), phase='prefill')+head-scale(heads=[[1, 2]], scale=-0.5)")
    assert items == (Knockout(queries="last", keys="system", layers=(0, 1), phase="prefill"),
                     HeadScale(heads=((1, 2),), scale=-0.5))
    # '+' inside a string or a bracket does not split the stack
    assert len(parse("residual-edit(add=[1e+0, 2.0], layers=[0])")) == 1


def test_defaults_fill_only_fields_the_spec_leaves_out():
    defaults = {"EAH": {"threshold": 0.01}, "PAI": {"alpha": 0.3}}
    assert parse("eah+pai", defaults=defaults) == (EAH.paper(threshold=0.01), PAI(alpha=0.3))
    assert parse("eah(threshold=0.5)", defaults=defaults) == (EAH.paper(threshold=0.5),)
    # the model's threshold replaces a preset's built-in one (the official 0.0008 is tuned for 576 image tokens)
    assert parse("eah-reference(layers=[1])", defaults=defaults)[0].threshold == 0.01
    # a class the defaults do not name is untouched
    assert parse("vaf", defaults=defaults) == (VAF(),)


def test_json_files_are_taken_as_written(tmp_path):
    stack = (EAH.paper(threshold=0.02), PAI(alpha=0.4), Knockout(keys="system"))
    listed = tmp_path / "stack.json"
    listed.write_text(json.dumps([i.to_dict() for i in stack]))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"interventions": [i.to_dict() for i in stack]}))
    single = tmp_path / "one.json"
    single.write_text(json.dumps(PAI(alpha=0.4).to_dict()))
    assert parse(str(listed)) == stack and parse(wrapped) == stack
    assert parse(str(single), defaults={"PAI": {"alpha": 9.0}}) == (PAI(alpha=0.4),)


CASES = [
    EAH.paper(threshold=0.03, layers=(1, 2), source="fewest"),
    EAH.reference(layers=(3,)),
    PAI(alpha=0.5, layers=(1,), phase="decode"),
    VAR(dims=(3, 5), tau=7.5, layers=(1, 2)),
    VAF(image_scale=1.3),
    MiddleLayerBoost(alpha=0.25),
    ADHH(heads=((1, 2), (3, 0)), tau=0.5),
    HeadScale(heads=((0, 1),), scale=2.0),
    Knockout(queries="question", keys="image", layers=(0,)),
    ValueEdit(keys="image", scale=0.5, heads=(0,)),
    ResidualEdit(layers=(1,), where="input", positions="question", scale=0.5),
    SyntheticMap(pattern="uniform"),
]


def test_format_spec_round_trips_every_method():
    for item in CASES:
        assert parse(format_spec([item])) == (item,), format_spec([item])
    assert parse(format_spec(CASES)) == tuple(CASES)
    assert format_spec([]) == "none"
    assert format_spec([PAI()]) == "PAI"
    assert format_spec([PAI(alpha=0.5, layers=(1, 2))]) == "PAI(alpha=0.5, layers=(1, 2))"  # base fields last


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty intervention spec"),
    ("pai(alpah=1)", r"no field\(s\) \['alpah'\] on PAI; its fields: \['alpha', 'layers', 'phase'\]"),
    ("nope", "Unknown intervention 'nope'; known: .*eah-reference"),
    ("pai(0.5)", "by name"),
    ("eah+", "empty term"),
    ("pai(alpha=x)", "must be a Python literal"),
    ("pai(alpha=0.5", "Unclosed bracket"),
    ("pai(alpha=0.5))", "Unbalanced"),
    ("none+eah", "stands alone"),
    ("pai(alpha=-1)", "PAI.alpha must be a number >= 0"),
    ("var", "sink dimensions"),
    ("missing.json", "No intervention file"),
    ("pai(**{'alpha': 1})", r"'\*\*' is not part"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse(spec)


def test_bad_json_files_say_what_is_wrong(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="Cannot read the intervention file"):
        parse(path)
    path.write_text(json.dumps([{"alpha": 1}]))
    with pytest.raises(ConfigError, match=r"entries \[0\] have no 'method'"):
        parse(path)


def test_objects_pass_through():
    assert parse(PAI()) == (PAI(),) and parse([EAH.paper(), PAI()]) == (EAH.paper(), PAI())
    with pytest.raises(ConfigError, match="holds Intervention objects"):
        parse([PAI(), "eah"])


@dataclass(frozen=True)
class DoubleLastRow(Intervention):
    """A method defined outside the library: reachable by its class name with no registration."""

    factor: float = 2.0
    layers: tuple[int, ...] | None = None
    phase: str = "both"

    point: ClassVar[str] = "probs"

    def describe(self) -> str:
        return f"scale the last row by {self.factor}"


def test_a_new_class_is_reachable_by_name_and_a_preset_by_registration():
    assert parse("double-last-row(factor=3.0)+pai") == (DoubleLastRow(factor=3.0), PAI())
    try:
        register_preset("double-strong", lambda **kw: DoubleLastRow(**{"factor": 5.0, **kw}), method=DoubleLastRow,
                        summary="a registered setting")
        assert parse("double-strong(layers=[0])") == (DoubleLastRow(factor=5.0, layers=(0,)),)
        assert parse("double-strong", defaults={"DoubleLastRow": {"factor": 1.5}}) == (DoubleLastRow(factor=1.5),)
        assert presets()["double-strong"].summary == "a registered setting"
        with pytest.raises(ConfigError, match="already exists"):
            register_preset("Double_Strong", lambda **kw: PAI(), method=PAI)
    finally:
        spec_module._PRESETS.pop("doublestrong", None)
    with pytest.raises(ConfigError, match="pass method="):
        register_preset("anonymous", lambda **kw: PAI())


def test_entry_points_are_loaded_for_unknown_names(monkeypatch):
    loaded = []

    class Entry:
        def load(self):
            loaded.append(True)

            @dataclass(frozen=True)
            class FromAPlugin(Intervention):
                layers: tuple[int, ...] | None = None
                phase: str = "both"

            return FromAPlugin

    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Entry()] if group == "eah_interp.interventions" else [])
    monkeypatch.setattr(spec_module, "_ENTRY_POINTS_LOADED", False)
    try:
        assert type(parse("from-a-plugin")[0]).__name__ == "FromAPlugin" and loaded == [True]
    finally:
        from eah_interp.interventions.base import _METHODS

        _METHODS.pop("FromAPlugin", None)
