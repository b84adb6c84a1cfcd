"""`python -m cnclip.probe`: the same as `cnclip probe` (cnclip/commands/probe.py)."""

import sys

from cnclip.commands.probe import main

if __name__ == "__main__":
    sys.exit(main())
