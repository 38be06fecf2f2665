"""The project's tools, apart from its core.

The core is the rest of `trainer/`: configuration and presets (`config/`), the model, the losses and the task
(`modeling/`), the DeepSpeed engine, the optimizer settings and the training step without DeepSpeed (`engine/`), the
training loop, evaluation and the run folder (`run/`), checkpointing (`checkpoint/`) and the export (`serve/`).
`trainer/main.py` trains with it.

The tools measure or explore with the core and are not needed to train:
- `bench/`: training throughput of the model variants (`python -m trainer.tools.bench`);
- `compare/`: the paper's comparison, one real training run per variant and seed (`python -m trainer.tools.compare`);
- `preset_search.py`: many short trainings on easy-VQA, scored per question type (`python -m trainer.tools.preset_search`).

Tools import the core, never the other way: no core module imports `trainer.tools` (tests/test_boundaries.py). Each
tool is its own command: `python -m trainer.tools.<tool>` (a package's `__main__.py`, or the module itself).
"""
