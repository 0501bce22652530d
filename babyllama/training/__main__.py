"""`python -m babyllama.training ARGS` is `babyllama train ARGS`."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
