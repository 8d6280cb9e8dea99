"""The synthetic world: procedurally generated scenes, captions and label maps."""
