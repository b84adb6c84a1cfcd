"""`python -m cnclip.publish`: the same as `cnclip publish` (cnclip/commands/publish.py)."""

import sys

from cnclip.commands.publish import main

if __name__ == "__main__":
    sys.exit(main())
