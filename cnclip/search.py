"""`python -m cnclip.search`: the same as `cnclip search` (cnclip/commands/search.py)."""

import sys

from cnclip.commands.search import main

if __name__ == "__main__":
    sys.exit(main())
