"""``python -m autoprobe``: the same command line as the ``autoprobe`` script."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module (a doctest collector does) must not run the CLI
    sys.exit(main())
