import torch.nn.functional as F


def point_sample(inputs, point_coords, **kwargs):
    """(N, C, H, W) at (N, P, 2) points in [0, 1] -> (N, C, P)."""
    grid = 2.0 * point_coords.unsqueeze(2) - 1.0
    return F.grid_sample(inputs, grid, **kwargs).squeeze(3)


def get_uncertain_point_coords_with_randomness(*args, **kwargs):
    raise NotImplementedError("training-time point sampling is not in the stand-in")
