"""``python -m bench.cli``: the same as the ``attnbench`` command."""

import sys

from bench.cli import main

sys.exit(main())
