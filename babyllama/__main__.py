"""`python -m babyllama ...` is the `babyllama` command (also what torchrun runs: -m babyllama train)."""

import sys

from .cli import main

sys.exit(main())
