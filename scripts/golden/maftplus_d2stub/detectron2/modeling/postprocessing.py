import torch.nn.functional as F


def sem_seg_postprocess(result, img_size, output_height, output_width):
    """(C, H_pad, W_pad) -> crop to ``img_size`` -> bilinear resize to the output size."""
    result = result[:, : img_size[0], : img_size[1]][None]
    return F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]
