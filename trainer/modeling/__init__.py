"""Stage 4, model: the fused ViLT + CLIP model, its losses, the task, compilation and pretrained weights."""
