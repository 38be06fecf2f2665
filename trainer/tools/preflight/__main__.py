"""`python -m trainer.tools.preflight`: the pre-launch check (trainer/tools/preflight/cli.py)."""

import sys

from trainer.tools.preflight.cli import main

sys.exit(main())
