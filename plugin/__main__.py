"""``python -m plugin`` is the same as the ``radpipe`` command."""

import sys

from plugin.cli import main

sys.exit(main())
