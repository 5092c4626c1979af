"""One grammar for intervention lists, shared by Python, the CLI (``eval --arm``, ``generate
--interventions``) and the lmms-eval plugin (``interventions=...``).

A spec is one of::

    none                         the plain model (an empty list)
    eah                          a preset name (`presets`; case, '-' and '_' do not matter)
    pai(alpha=0.5)               a call: keyword arguments written as Python literals
    eah+pai(alpha=0.5)           a stack, applied in this order (see `eah_interp.hf.intervene`)
    path/to/stack.json           a JSON file: one ``to_dict()`` entry, a list of them, or
                                 ``{"interventions": [...]}``

Every `Intervention` subclass is reachable by its class name (``HeadScale``, ``head-scale``,
``headscale``) as soon as it is defined, with no registration; `register_preset` adds a named setting
(e.g. the official settings for one checkpoint). Classes defined in another package are found through
the entry-point group ``eah_interp.interventions`` (each entry point names a module or a class to import).

``defaults`` fills fields a spec does not set, per class name, e.g. a model's sink threshold
(``{"EAH": {"threshold": bundle.threshold}}``, `eah_interp.models.ModelBundle.intervention_defaults`).
A JSON file is taken as written (no defaults): it is the explicit form. `format_spec` writes a list back
as a spec, so ``parse(format_spec(items)) == items``.

Example:
    >>> parse("eah+pai(alpha=0.5)", defaults={"EAH": {"threshold": 0.01}})
    (EAH(layers=(1,), threshold=0.01, ...), PAI(alpha=0.5, layers=None, phase='both'))
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eah_interp.errors import ConfigError
from eah_interp.interventions.base import _METHODS, Intervention

#: What a spec may be: text, a JSON file path, one intervention or a list of them.
Spec = str | os.PathLike | Intervention | Iterable[Intervention]
#: Per class name, field values a spec does not set itself (model-aware defaults).
Defaults = Mapping[str, Mapping[str, Any]]

#: The entry-point group other packages use to make their interventions reachable by name.
ENTRY_POINT_GROUP = "eah_interp.interventions"


@dataclass(frozen=True)
class Preset:
    """A named setting: ``factory(**overrides)`` builds it; ``method`` is the class it builds."""

    name: str
    factory: Callable[..., Intervention]
    method: type[Intervention]
    summary: str


_PRESETS: dict[str, Preset] = {}


def _key(name: str) -> str:
    """Names match ignoring case, '-' and '_' (``head-scale`` = ``HeadScale`` = ``head_scale``)."""
    return re.sub(r"[-_]", "", name).lower()


def _kebab(class_name: str) -> str:
    """``MiddleLayerBoost`` -> ``middle-layer-boost``, ``ADHH`` -> ``adhh`` (how `format_spec` names a class)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", class_name).lower()


def register_preset(
    name: str, factory: Callable[..., Intervention], *, summary: str = "", method: type[Intervention] | None = None
) -> None:
    """Make ``name`` (and ``name(field=value, ...)``) build ``factory(**overrides)`` in a spec.

    Args:
        name: the preset's name (letters, digits, '-', '_'); matched ignoring case, '-' and '_'.
        factory: an `Intervention` class or a function / classmethod returning one, taking field
            overrides as keyword arguments.
        summary: one line for the preset table (``eah-interp eval --help``, docs/methods.md).
        method: the class the factory builds, for ``defaults`` (found by itself for a class or a
            classmethod; give it for a plain function).

    Raises:
        ConfigError: a bad name, or a name another preset or class already has.
    """
    if not re.fullmatch(r"[A-Za-z][\w\-]*", name):
        raise ConfigError(f"A preset name takes letters, digits, '-' and '_', starting with a letter; got {name!r}.")
    if method is None:
        owner = factory if isinstance(factory, type) else getattr(factory, "__self__", None)
        method = owner if isinstance(owner, type) and issubclass(owner, Intervention) else None
    if method is None:
        raise ConfigError(f"register_preset({name!r}, ...): pass method=<the Intervention class the factory builds>.")
    existing = _PRESETS.get(_key(name))
    if existing is not None and existing.factory != factory:
        raise ConfigError(f"A preset named {existing.name!r} already exists ({existing.summary}); choose another name.")
    _PRESETS[_key(name)] = Preset(name, factory, method, summary or (factory.__doc__ or "").strip().split("\n")[0])


def presets() -> dict[str, Preset]:
    """Every named preset, by name (the classes themselves are reachable by their names too)."""
    return {p.name: p for p in _PRESETS.values()}


# ---------------------------------------------------------------------------- parsing
def parse(spec: Spec, *, defaults: Defaults | None = None) -> tuple[Intervention, ...]:
    """The interventions a spec names, in order (see the module docstring for the grammar).

    Args:
        spec: spec text, a JSON file path, an `Intervention`, or a list of them (returned as a tuple).
        defaults: per class name, field values used where the spec does not set the field (text specs
            only; a JSON file and objects are taken as they are).

    Returns:
        A tuple of interventions (empty for ``"none"``).

    Raises:
        ConfigError: malformed text, an unknown name or field, an invalid value (the class's own message),
            or an unreadable JSON file.
    """
    kinds = Intervention
    if isinstance(spec, kinds):
        return (spec,)
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.strip().lower().endswith(".json")):
        return _from_json_file(Path(spec))
    if not isinstance(spec, str):
        items = tuple(spec)
        bad = [type(x).__name__ for x in items if not isinstance(x, kinds)]
        if bad:
            raise ConfigError(f"An intervention list holds Intervention objects; got {', '.join(bad)}.")
        return items
    text = spec.strip()
    if not text:
        raise ConfigError("An empty intervention spec: write 'none' for the plain model, or e.g. 'eah' or 'eah+pai'.")
    if _key(text) == "none":
        return ()
    return tuple(_term(term, text, defaults or {}) for term in _split_stack(text))


def _split_stack(text: str) -> list[str]:
    """``a+b(x=[1, 2])+c`` -> ``["a", "b(x=[1, 2])", "c"]``: '+' outside brackets and strings."""
    terms, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote and text[i - 1] != "\\" else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"Unbalanced ')' at character {i} of the intervention spec {text!r}.")
        elif char == "+" and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ConfigError(f"Unclosed {'string' if quote else 'bracket'} in the intervention spec {text!r}.")
    terms.append(text[start:])
    empty = [i for i, t in enumerate(terms) if not t.strip()]
    if empty:
        raise ConfigError(f"The intervention spec {text!r} has an empty term around a '+'.")
    return [t.strip() for t in terms]


_TERM = re.compile(r"(?P<name>[A-Za-z][\w\-]*)\s*(?:\((?P<args>.*)\))?", re.DOTALL)


def _term(term: str, whole: str, defaults: Defaults) -> Intervention:
    match = _TERM.fullmatch(term)
    if match is None:
        raise ConfigError(
            f"Cannot read {term!r} in the intervention spec {whole!r}: write a name (eah) or a call with keyword "
            "arguments (pai(alpha=0.5))."
        )
    name, args = match["name"], match["args"]
    if _key(name) == "none":
        raise ConfigError(f"'none' stands alone (the plain model); it cannot be stacked: {whole!r}.")
    factory, method = _resolve(name)
    overrides = _keywords(args, term) if args is not None else {}
    given = {**dict(defaults.get(method.__name__, {})), **overrides}
    try:
        return factory(**given)
    except TypeError as err:
        known = sorted(f.name for f in dataclasses.fields(method) if f.init)
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(
                f"{name}: no field(s) {unknown} on {method.__name__}; its fields: {known}."
            ) from None
        raise ConfigError(f"{term}: {err}") from None


def _keywords(args: str, term: str) -> dict[str, Any]:
    """``alpha=0.5, layers=[1, 2]`` -> ``{"alpha": 0.5, "layers": (1, 2)}`` (Python literals only)."""
    try:
        call = ast.parse(f"_({args})", mode="eval").body
    except SyntaxError as err:
        raise ConfigError(f"Cannot read the arguments of {term!r}: {err.msg}.") from None
    assert isinstance(call, ast.Call)
    if call.args:
        raise ConfigError(f"{term!r}: give arguments by name (e.g. pai(alpha=0.5)), not by position.")
    out: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise ConfigError(f"{term!r}: '**' is not part of the spec grammar; name each field.")
        try:
            value = ast.literal_eval(keyword.value)
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"{term!r}: {keyword.arg}= must be a Python literal (number, string, True/False/None, list or tuple); "
                f"got {ast.unparse(keyword.value)!r}."
            ) from None
        out[keyword.arg] = _tuples(value)
    return out


def _tuples(value: Any) -> Any:
    """Lists as tuples, recursively (interventions are frozen and hashable)."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def _resolve(name: str) -> tuple[Callable[..., Intervention], type[Intervention]]:
    """The factory and class a name stands for: a preset, else a class (loading entry points once)."""
    key = _key(name)
    for attempt in range(2):
        if key in _PRESETS:
            return _PRESETS[key].factory, _PRESETS[key].method
        classes = {_key(n): cls for n, cls in _METHODS.items()}
        if key in classes:
            return classes[key], classes[key]
        if attempt == 0 and not _load_entry_points():
            break
    known = sorted({p.name for p in _PRESETS.values()} | {_kebab(n) for n in _METHODS})
    raise ConfigError(f"Unknown intervention {name!r}; known: {', '.join(known)} (or a JSON file of to_dict() entries).")


_ENTRY_POINTS_LOADED = False


def _load_entry_points() -> bool:
    """Import the modules of the ``eah_interp.interventions`` entry points (once); whether any was new."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return False
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    found = False
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
        found = True
    return found


def _from_json_file(path: Path) -> tuple[Intervention, ...]:
    if not path.is_file():
        raise ConfigError(f"No intervention file {str(path)!r} (a spec ending in .json names a file of to_dict() entries).")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"Cannot read the intervention file {str(path)!r}: {err}.") from None
    if isinstance(data, dict) and "interventions" in data:
        data = data["interventions"]
    entries = [data] if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(
            f"{str(path)!r} must hold one to_dict() entry, a list of them, or {{\"interventions\": [...]}}."
        )
    missing = [i for i, e in enumerate(entries) if "method" not in e]
    if missing:
        raise ConfigError(f"{str(path)!r}: entries {missing} have no 'method' (the intervention's class name).")
    return tuple(Intervention.from_dict(e) for e in entries)


# ---------------------------------------------------------------------------- writing
def format_spec(items: Iterable[Intervention]) -> str:
    """The spec text of a list: ``Class(field=value, ...)`` terms with the fields that differ from the
    class's defaults, joined by '+' (``"none"`` for an empty list). ``parse(format_spec(x)) == tuple(x)``."""
    terms = []
    for item in items:
        cls = type(item)
        changed = []
        own_first = sorted(dataclasses.fields(item), key=lambda f: f.kw_only)  # the method's fields, then layers / phase
        for f in own_first:
            if not f.init or not f.compare:
                continue
            value = getattr(item, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING or value != default:
                changed.append(f"{f.name}={value!r}")
        terms.append(cls.__name__ + (f"({', '.join(changed)})" if changed else ""))
    return "+".join(terms) or "none"


# ---------------------------------------------------------------------------- built-in presets
def _register_builtins() -> None:
    from eah_interp.interventions.adhh import ADHH
    from eah_interp.interventions.eah import EAH
    from eah_interp.interventions.head_scale import HeadScale
    from eah_interp.interventions.var import VAR

    register_preset("eah", EAH.paper, method=EAH, summary="EAH as in the paper: layer 1 ('layer two'), causal normaliser")
    register_preset("eah-reference", EAH.reference, method=EAH,
                    summary="EAH as the official code runs it: layer 15, official normaliser, no broadcast from head 0")
    register_preset("var-llava15-7b", VAR.llava15_7b, summary="VAR with LLaMA-2-7B's sink dims (LLaVA-1.5-7B)")
    register_preset("var-llava15-13b", VAR.llava15_13b, summary="VAR with LLaMA-2-13B's sink dims (LLaVA-1.5-13B)")
    register_preset("adhh-llava15-7b", ADHH.llava15_7b, summary="AD-HH with the official head list of LLaVA-1.5-7B")
    register_preset("allpath", HeadScale.allpath,
                    summary="AllPath's head scaling: hallucination heads x0, good heads x2 (pass both head lists)")


_register_builtins()
