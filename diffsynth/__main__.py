"""``python -m diffsynth ...``: the command line (also what ``torchrun -m diffsynth`` starts)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
