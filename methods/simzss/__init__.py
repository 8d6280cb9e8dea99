"""SimZSS: a text encoder aligned to a frozen DINOv2 backbone from captions (global + concept loss)."""

from ovseg.methods.simzss.module import SimZSS

__all__ = ["SimZSS"]
