"""CDT: the MAFT+ recipe (fine-tuned CLIP image trunk, Content-Dependent Transfer, Representation
Compensation, mask-aware loss) on a Mask2Former proposal head."""

from ovseg.methods.cdt.module import CDT

__all__ = ["CDT"]
