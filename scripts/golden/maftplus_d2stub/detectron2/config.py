"""``configurable`` and a dict-with-attributes ``CfgNode``."""

import functools


class CfgNode(dict):
    """Nested dict readable as attributes (``cfg.MODEL.MASK_FORMER.NHEADS``)."""

    def __init__(self, entries=None):
        super().__init__()
        for key, value in (entries or {}).items():
            self[key] = CfgNode(value) if isinstance(value, dict) else value

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def configurable(init_func):
    """``__init__(cfg, ...)`` goes through ``cls.from_config``; explicit keyword arguments pass through."""

    @functools.wraps(init_func)
    def wrapped(self, *args, **kwargs):
        if args and isinstance(args[0], CfgNode):
            return init_func(self, **type(self).from_config(*args, **kwargs))
        return init_func(self, *args, **kwargs)

    return wrapped
