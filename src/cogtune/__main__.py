"""`python -m cogtune`: the same as the `cogtune` command."""

import sys

from .cli import main

sys.exit(main())
