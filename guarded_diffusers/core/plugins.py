"""The process-wide plugin manager: built-in strategies, entry-point plugins, run-time registrations.

External plugins are loaded once, from the ``guarded_diffusers`` entry-point group, the first
time the manager is needed. Set ``GUARDED_DIFFUSERS_DISABLE_PLUGIN_AUTOLOAD=1`` to keep them out
(built-ins are always there). Register a plugin at run time with
``plugin_manager().register(plugin)``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import pluggy

from ..strategies import clamp, guidance, rescale, residual, stream_rescale, upcast
from . import hookspecs
from .recovery import RecoveryStrategy

ENTRY_POINT_GROUP = "guarded_diffusers"
DISABLE_AUTOLOAD_ENV = "GUARDED_DIFFUSERS_DISABLE_PLUGIN_AUTOLOAD"

# The targeted fix first (it declines anything but its own case, at no cost); then best fidelity
# first: a float32 island reaches float32's accuracy, a power-of-two shift keeps float16 weights
# at the cost of an approximation where the path is not homogeneous. A stream out of range (no
# region fits back) is rescaled exactly first, which costs nothing per step once made, and carried
# in float32 where that measures beyond the tolerance (float16's precision next to a massive
# activation); a clamp changes the values it saturates.
DEFAULT_STRATEGIES: tuple[str, ...] = ("guidance", "upcast", "rescale", "stream_rescale", "residual", "clamp")

_BUILTIN_PLUGINS = (guidance, upcast, rescale, stream_rescale, residual, clamp)


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The one PluginManager of this process, with built-ins and (unless disabled) entry points."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for plugin in _BUILTIN_PLUGINS:
        manager.register(plugin, name=f"{hookspecs.PROJECT_NAME}.builtin.{plugin.__name__.rsplit('.', 1)[1]}")
    if not os.environ.get(DISABLE_AUTOLOAD_ENV):
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def registered_strategies() -> dict[str, RecoveryStrategy]:
    """Every strategy the registered plugins offer, by name; two plugins may not share a name."""
    found: dict[str, RecoveryStrategy] = {}

    def register(strategy: RecoveryStrategy) -> None:
        if not isinstance(strategy, RecoveryStrategy):
            raise TypeError(
                f"{strategy!r} is not a RecoveryStrategy: it needs `name`, `recover` and `apply`."
            )
        if strategy.name in found:
            raise ValueError(
                f"Two plugins register a recovery strategy named {strategy.name!r}: "
                f"{found[strategy.name]!r} and {strategy!r}."
            )
        found[strategy.name] = strategy

    plugin_manager().hook.register_strategies(register=register)
    return found


def resolve_strategies(names: Sequence[str] | None) -> list[RecoveryStrategy]:
    """The strategies named in ``names``, in that order (``None``: the default order).

    Raises ``ValueError`` listing the known names for an unknown one, before any model is loaded.
    """
    if isinstance(names, str):
        raise TypeError(f"`guard_strategies` must be a list of names, not the string {names!r}.")
    wanted = list(DEFAULT_STRATEGIES if names is None else names)
    known = registered_strategies()
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(
            f"Unknown recovery strateg{'y' if len(unknown) == 1 else 'ies'} in `guard_strategies`: "
            f"{', '.join(map(repr, unknown))}. Known: {', '.join(sorted(known))}."
        )
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"`guard_strategies` names a strategy twice: {wanted}.")
    return [known[name] for name in wanted]
