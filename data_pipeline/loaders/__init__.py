"""Stage 3, load: shard folders into batches (`build_loader`: DALI or PyTorch), with resumable loader state."""
