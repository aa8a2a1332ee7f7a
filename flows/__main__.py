"""``python -m flows``: the pipeline's Prefect flow (:mod:`flows.cli`)."""

import sys

from flows.cli import main

sys.exit(main())
