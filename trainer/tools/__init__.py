"""The project's tools, apart from its core.

The core is the rest of `trainer/`: configuration and presets, the model, the losses and the task, the DeepSpeed
engine (`engine.py`), the training loop (`loop.py`), checkpointing, evaluation, the run folder, the optimizer
settings (`optim.py`) and the training step without DeepSpeed (`plain.py`). `trainer/main.py` trains with it.

The tools measure or explore with the core and are not needed to train:
- `bench/`: training throughput of the model variants (`python -m trainer.tools.bench`);
- `compare/`: the paper's comparison, one real training run per variant and seed (`python -m trainer.tools.compare`);
- `preset_search.py`: many short trainings on easy-VQA, scored per question type (`python -m trainer.tools.preset_search`).

Tools import the core, never the other way: no core module imports `trainer.tools` (tests/test_boundaries.py). The
command names are the small entry modules `trainer/tools/bench/`, `trainer/tools/compare/` and `trainer/tools/preset_search.py`.
"""
