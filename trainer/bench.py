"""`python -m trainer.bench`: the benchmark (trainer/tools/bench/) under the command name its docs and reports quote."""

import sys

from trainer.tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
