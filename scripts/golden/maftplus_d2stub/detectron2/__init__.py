"""Stand-in for the pieces of detectron2 that MAFT+ imports (see ../README.md)."""
