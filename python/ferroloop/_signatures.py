"""The running Python's asyncio signatures for methods written once for every version.

ferroloop's loop methods are written with the newest asyncio's parameters. A keyword asyncio
added later (`all_errors` in 3.12, `keep_alive` in 3.13 ...) must not be accepted on a Python
whose asyncio lacks it: asyncio's own loop raises TypeError there, and a program that works on
ferroloop must work on asyncio. `@since(name=(3, 12), ...)` gives such a method, on an older
Python, the signature asyncio has there: a generated function with exactly the parameters that
exist (so `inspect.signature`, the TypeError and its message come from CPython itself), which
calls the full method with the dropped keywords at their defaults. On a Python that has all of
them the method is returned unchanged. Only parameters with defaults can be dropped (keyword-only
ones, or trailing positional ones); every call of these methods is a cold path (one per
connection, server or shutdown).
"""

from __future__ import annotations

import inspect
import sys

_P = inspect.Parameter


def since(**first_versions):
    """Drop each parameter `name=(major, minor)` on Pythons older than that."""

    def decorate(func):
        absent = {n for n, v in first_versions.items() if sys.version_info < v}
        if not absent:
            return func
        return _without(func, absent)

    return decorate


def _without(func, absent):
    params = inspect.signature(func).parameters
    positional = [p.name for p in params.values() if p.kind is _P.POSITIONAL_OR_KEYWORD]
    for name in absent:
        p = params[name]
        # A positional one only if no kept positional parameter follows it.
        droppable = p.kind is _P.KEYWORD_ONLY or (
            p.kind is _P.POSITIONAL_OR_KEYWORD
            and set(positional[positional.index(name):]) <= absent
        )
        if not droppable or p.default is _P.empty:
            raise TypeError(f"{func.__qualname__}: cannot drop {name!r}")
    defaults = {}
    declared = []
    forwarded = []
    star = False
    for p in params.values():
        if p.name in absent:
            continue
        if p.kind is _P.POSITIONAL_ONLY:
            raise TypeError(f"{func.__qualname__}: positional-only parameters are not supported")
        text = p.name
        if p.default is not _P.empty:
            defaults[f"_default_{p.name}"] = p.default
            text = f"{p.name}=_default_{p.name}"
        if p.kind is _P.VAR_POSITIONAL:
            text, star = f"*{p.name}", True
            forwarded.append(text)
        elif p.kind is _P.VAR_KEYWORD:
            text = f"**{p.name}"
            forwarded.append(text)
        elif p.kind is _P.KEYWORD_ONLY:
            if not star:
                declared.append("*")
                star = True
            forwarded.append(f"{p.name}={p.name}")
        else:
            forwarded.append(p.name)
        declared.append(text)
    name = func.__name__
    if inspect.iscoroutinefunction(func):
        head, call = "async def", "await _func"
    else:
        head, call = "def", "_func"
    source = (
        f"def _make(_func, {', '.join(defaults) or '_=None'}):\n"
        f"    {head} {name}({', '.join(declared)}):\n"
        f"        return {call}({', '.join(forwarded)})\n"
        f"    return {name}\n"
    )
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - built above from a signature, no outside text
    wrapper = namespace["_make"](func, **defaults)
    # Not functools.wraps: its __wrapped__ would make inspect.signature show func's parameters.
    wrapper.__qualname__ = func.__qualname__
    wrapper.__module__ = func.__module__
    wrapper.__doc__ = func.__doc__
    if hasattr(wrapper.__code__, "co_qualname"):  # 3.11+: TypeError messages name it
        wrapper.__code__ = wrapper.__code__.replace(co_qualname=func.__qualname__)
    return wrapper
