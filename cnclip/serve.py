"""`python -m cnclip.serve`: the same as `cnclip serve` (cnclip/commands/serve.py)."""

import sys

from cnclip.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())
