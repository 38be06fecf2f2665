"""Stage 5, engine: the DeepSpeed engine and its config, the process group, the optimizer, the plain step."""
