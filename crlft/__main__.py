"""``python -m crlft`` is the ``crlft`` command."""

import sys

from crlft.cli import main

sys.exit(main())
