"""ovseg: open-vocabulary semantic segmentation with SimZSS, CDT (MAFT+) and ZegFormer."""

__version__ = "0.1.0"
