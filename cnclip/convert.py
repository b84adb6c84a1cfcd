"""`python -m cnclip.convert`: the same as `cnclip convert` (cnclip/commands/convert.py)."""

import sys

from cnclip.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
