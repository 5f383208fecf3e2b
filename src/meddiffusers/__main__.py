"""`python -m meddiffusers ...` and `accelerate launch -m meddiffusers ...` run the `meddiffusers` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
