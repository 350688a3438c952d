"""``python -m ssl_zoo fit --config experiments/<method>/demo.yaml``."""

from ssl_zoo.cli import main

if __name__ == "__main__":
    main()
