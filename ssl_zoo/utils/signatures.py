"""The keyword arguments a class accepts, through ``**kwargs`` handed up its class tree."""

from __future__ import annotations

import inspect


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Every named ``__init__`` parameter ``cls(...)`` accepts, by name, the most derived declaration first.

    The walk goes up ``cls.__mro__`` while each ``__init__`` hands ``**kwargs`` on to its parents, and stops at
    the first one that does not: a parent's argument that a child swallows is not an option of the child.
    """
    found: dict[str, inspect.Parameter] = {}
    for klass in getattr(cls, "__mro__", ()):
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                found.setdefault(p.name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return found
