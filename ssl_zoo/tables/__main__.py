"""``python -m ssl_zoo.tables``: see :mod:`ssl_zoo.tables.report`."""

import sys

from ssl_zoo.tables.report import main

sys.exit(main())
