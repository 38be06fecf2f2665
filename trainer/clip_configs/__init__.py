"""open_clip architecture configs of this project (tiny towers for tests and the CPU demo).

open_clip builds models by architecture name from JSON configs; registering this folder adds the names here
(e.g. `ViT-tiny-8`) beside open_clip's own (`ViT-B-32`, `RN50`, ...).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

CONFIG_DIR = Path(__file__).parent


@cache
def register_project_configs() -> None:
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
