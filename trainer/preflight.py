"""`python -m trainer.preflight`: the pre-launch check (trainer/tools/preflight/) under its command name."""

import sys

from trainer.tools.preflight.cli import main

if __name__ == "__main__":
    sys.exit(main())
