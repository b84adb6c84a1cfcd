"""`python -m cnclip.evaluate`: the same as `cnclip evaluate` (cnclip/commands/evaluate.py)."""

import sys

from cnclip.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
