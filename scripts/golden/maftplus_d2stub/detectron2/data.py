"""``MetadataCatalog``: names -> attribute bags."""

import types


class _Catalog(dict):
    def get(self, name):
        return self.setdefault(name, types.SimpleNamespace(name=name))


MetadataCatalog = _Catalog()
