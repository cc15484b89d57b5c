"""``python -m csidriver``: run the driver (same flags as ``qsnap serve``)."""

import sys

from csidriver.server import main

sys.exit(main())
