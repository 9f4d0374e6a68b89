"""`python -m pydron ...`: the same as the `pydron` command."""
import sys

from pydron.cli import main

if __name__ == "__main__":
    sys.exit(main())
