"""`python -m v4 ...` = `dsv4 ...` (what torchrun starts on every node: `torchrun ... -m v4 serve ...`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
