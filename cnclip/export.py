"""`python -m cnclip.export`: the same as `cnclip export` (cnclip/commands/export.py)."""

import sys

from cnclip.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
