"""`python -m data_pipeline.convert`: the conversion (data_pipeline/convert/cli.py)."""

import sys

from data_pipeline.convert.cli import main

sys.exit(main())
