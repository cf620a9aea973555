"""`python -m autolora ...` (and `torchrun -m autolora train ...`)."""
from .cli import entry

if __name__ == "__main__":
    entry()
