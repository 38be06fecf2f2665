"""Stage 6, loop: a run from start to end: the run folder, the training loop, evaluation, metrics, logs."""
