class Registry(dict):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def register(self, obj=None):
        def add(item):
            self[item.__name__] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name):
        if name not in self:
            raise KeyError(f"{name} is not registered in {self.name}")
        return self[name]
