"""The task's loss names and their TensorBoard tags, in a module without torch: the task returns these losses, the
loop sums and logs them, and the tools that read a run's events (the comparison) find them here without loading
torch."""

from __future__ import annotations

# What `VQATask.forward` returns: the total (what backward runs on), ViLT's VQA loss and the alignment loss (0 for a
# variant without one).
LOSS_NAMES = ("loss", "vqa_loss", "infonce_loss")


def loss_tag(name: str) -> str:
    """The TensorBoard tag of the task's loss `name`."""
    return f"train/{name}"
