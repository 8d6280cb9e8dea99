"""``ImageList`` (padding to a size divisibility); the other structures are unused placeholders."""

import torch
import torch.nn.functional as F


class ImageList:
    def __init__(self, tensor, image_sizes):
        self.tensor = tensor
        self.image_sizes = image_sizes

    @staticmethod
    def from_tensors(tensors, size_divisibility=0, pad_value=0.0):
        height = max(t.shape[-2] for t in tensors)
        width = max(t.shape[-1] for t in tensors)
        if size_divisibility > 1:
            height = -(-height // size_divisibility) * size_divisibility
            width = -(-width // size_divisibility) * size_divisibility
        batch = torch.stack(
            [F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=pad_value) for t in tensors]
        )
        return ImageList(batch, [tuple(t.shape[-2:]) for t in tensors])


class _Unused:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("not in the stand-in")


Boxes = Instances = BitMasks = _Unused
