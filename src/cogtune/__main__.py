"""`python -m cogtune`: the same as the `cogtune` command."""

import sys

from cogtune.cli import main

sys.exit(main())
