"""Every guarded class keeps its diffusers parent's signatures; the loaders add only the guard_* keywords.

diffusers' own test suites introspect them (``test_encode_prompt_works_in_isolation`` reads
``encode_prompt``'s parameters, ``test_pipeline_call_signature`` the call's).
"""

from __future__ import annotations

import inspect

import pytest

import guarded_diffusers.pipelines.attach  # noqa: F401  (defines and registers the named classes)
from guarded_diffusers.pipelines.guarded import _GUARDED_CLASSES

GUARD_KEYWORDS = [
    "guard_strategies",
    "guard_plan",
    "guard_fidelity",
    "guard_tolerance",
    "guard_max_extra_memory",
]
LOADERS = ("from_pretrained", "from_pipe")
NAMED = sorted(
    (
        (base, cls)
        for base, cls in _GUARDED_CLASSES.items()
        if cls.__module__ != "guarded_diffusers.pipelines.guarded"
    ),
    key=lambda pair: pair[0].__name__,
)


def _signature(cls: type, name: str, eval_str: bool = False) -> inspect.Signature:
    return inspect.signature(getattr(cls, name), eval_str=eval_str)


def _same_signature(guarded: type, base: type, name: str) -> bool:
    """Equal as written, or once string annotations (``from __future__ import annotations``) are evaluated."""
    return any(
        _signature(guarded, name, eval_str) == _signature(base, name, eval_str) for eval_str in (False, True)
    )


@pytest.mark.parametrize(("base", "guarded"), NAMED, ids=[base.__name__ for base, _ in NAMED])
def test_every_shared_public_method_has_the_parents_signature(base, guarded):
    shared = [
        name
        for name in dir(guarded)
        if (not name.startswith("_") or name == "__call__")
        and name not in LOADERS
        and callable(getattr(base, name, None))
    ]
    assert {"__call__", "save_pretrained", "to", "to_json_string"} <= set(shared)
    assert [name for name in shared if not _same_signature(guarded, base, name)] == []


@pytest.mark.parametrize(("base", "guarded"), NAMED, ids=[base.__name__ for base, _ in NAMED])
@pytest.mark.parametrize("name", LOADERS)
def test_loaders_add_only_the_guard_keywords(base, guarded, name):
    ours = _signature(guarded, name, eval_str=True)
    added = [p for p in ours.parameters.values() if p.name.startswith("guard_")]
    assert [p.name for p in added] == GUARD_KEYWORDS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in added)
    rest = [p for p in ours.parameters.values() if p not in added]
    assert ours.replace(parameters=rest) == _signature(base, name, eval_str=True)
