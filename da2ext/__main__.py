"""python -m da2ext ...: the command line (da2ext/cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
