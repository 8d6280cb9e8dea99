def get_world_size():
    return 1


def get_local_rank():
    return 0


def synchronize():
    return None
