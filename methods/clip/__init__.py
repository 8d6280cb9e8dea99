"""CLIP pretraining: contrastive image-caption training of an open_clip model (both towers), to
give the mask-supervised methods a CLIP that has read about every category. Export for
``checkpoint_path`` options: :mod:`ovseg.methods.clip.export`."""

from ovseg.methods.clip.module import CLIP

__all__ = ["CLIP"]
