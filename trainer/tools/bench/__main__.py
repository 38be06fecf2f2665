"""`python -m trainer.tools.bench`: the benchmark (trainer/tools/bench/cli.py)."""

import sys

from trainer.tools.bench.cli import main

sys.exit(main())
