"""``python -m ssl_zoo fit --config experiments/<method>/demo.yaml``."""

import sys

from ssl_zoo.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
