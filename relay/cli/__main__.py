"""``python -m relay.cli``: the same as the ``parley-relay`` command."""

import sys

from relay.cli import main

sys.exit(main())
