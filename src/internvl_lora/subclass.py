"""Subclasses made at run time for one module instance (`module.__class__ = make(type(module))`): a change of
behaviour that keeps the module's name, attributes and state dict.

`runtime_subclass` turns `make(cls) -> subclass of cls` into a cached maker whose classes take `cls`'s name
and pickle (and deep-copy) as `cls`, made again on loading: a class defined inside a function cannot be
pickled by name.
"""

from __future__ import annotations

import functools


def runtime_subclass(make):
    """Decorator for a module-level `make(cls)`; the decorated name stays what pickles refer to."""

    @functools.cache
    @functools.wraps(make)
    def cached(cls):
        sub = make(cls)
        sub.__name__ = sub.__qualname__ = cls.__name__
        sub.__reduce__ = lambda self: (_restore, (cached, cls, self.__getstate__()))
        return sub

    return cached


def _restore(make, cls, state):
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    obj.__class__ = make(cls)
    return obj
