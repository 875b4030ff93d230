"""``python -m ctbench``: the ctbench command (what ``torchrun -m ctbench train ...`` runs)."""
import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker imports this module as its parent's main
    sys.exit(main())
