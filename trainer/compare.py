"""`python -m trainer.compare`: the paper's comparison (trainer/tools/compare/) under its documented command name."""

import sys

from trainer.tools.compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
