"""GuardedFluxFillPipeline keeps FluxFillPipeline's signatures; the loaders add only the guard_* keywords."""

from __future__ import annotations

import inspect

import pytest
from diffusers import FluxFillPipeline

from guarded_diffusers import GuardedFluxFillPipeline

GUARD_KEYWORDS = [
    "guard_strategies",
    "guard_plan",
    "guard_fidelity",
    "guard_tolerance",
    "guard_max_extra_memory",
]
LOADERS = ("from_pretrained", "from_pipe")


def _signature(cls: type, name: str, eval_str: bool = False) -> inspect.Signature:
    return inspect.signature(getattr(cls, name), eval_str=eval_str)


def _same_signature(name: str) -> bool:
    """Equal as written, or once string annotations (``from __future__ import annotations``) are evaluated."""
    return any(
        _signature(GuardedFluxFillPipeline, name, eval_str) == _signature(FluxFillPipeline, name, eval_str)
        for eval_str in (False, True)
    )


def test_every_shared_public_method_has_the_parents_signature():
    shared = [
        name
        for name in dir(GuardedFluxFillPipeline)
        if (not name.startswith("_") or name == "__call__")
        and name not in LOADERS
        and callable(getattr(FluxFillPipeline, name, None))
    ]
    assert {"__call__", "encode_prompt", "save_pretrained", "to", "to_json_string"} <= set(shared)
    assert [name for name in shared if not _same_signature(name)] == []


@pytest.mark.parametrize("name", LOADERS)
def test_loaders_add_only_the_guard_keywords(name):
    ours = _signature(GuardedFluxFillPipeline, name, eval_str=True)
    added = [p for p in ours.parameters.values() if p.name.startswith("guard_")]
    assert [p.name for p in added] == GUARD_KEYWORDS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in added)
    rest = [p for p in ours.parameters.values() if p not in added]
    assert ours.replace(parameters=rest) == _signature(FluxFillPipeline, name, eval_str=True)
