"""open_clip architecture configs of this project (tiny towers for tests and the CPU demo).

open_clip builds models by architecture name from JSON configs; registering this folder adds the names here
(e.g. `ViT-tiny-8`) beside open_clip's own (`ViT-B-32`, `RN50`, ...).

Both packages need the names: `data_pipeline.text` builds the CLIP tokenizer of an architecture,
`trainer.modeling.model` the CLIP tower. They live in `common`, which both import. The JSON files ship as package data
(pyproject.toml) and are found beside this file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

CONFIG_DIR = Path(__file__).parent


@cache
def register_project_configs() -> None:
    import open_clip  # lazy: ~2 s, which importing the modules that call this need not pay

    open_clip.add_model_config(CONFIG_DIR)
