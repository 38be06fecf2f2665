"""`python -m trainer.checkpoint`: checkpoint conversion and listing (trainer/checkpoint/universal.py)."""

import sys

from trainer.checkpoint.universal import main

sys.exit(main())
