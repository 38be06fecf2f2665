"""`python -m trainer.launch`: what launch.sh runs for `train` and `tensorboard`."""

import sys

from trainer.launch.cli import main

sys.exit(main())
