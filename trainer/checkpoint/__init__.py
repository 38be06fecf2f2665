"""Stage 7, checkpoint: the Checkpointer, what is on disk, safe loading, integrity, universal checkpoints."""
