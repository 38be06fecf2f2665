"""`python -m trainer.tools.compare`: the paper's comparison (trainer/tools/compare/cli.py)."""

import sys

from trainer.tools.compare.cli import main

sys.exit(main())
