"""Stand-in for the compiled CUDA op: every call raises, so MSDeformAttn uses its PyTorch fallback."""


def ms_deform_attn_forward(*args, **kwargs):
    raise RuntimeError("no compiled MultiScaleDeformableAttention op in the stand-in")


ms_deform_attn_backward = ms_deform_attn_forward
