"""`python -m trainer.preset_search`: the preset search (trainer/tools/preset_search.py) under its documented name."""

import sys

from trainer.tools.preset_search import main

if __name__ == "__main__":
    sys.exit(main())
