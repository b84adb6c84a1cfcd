"""`python -m cnclip.zeroshot`: the same as `cnclip zeroshot` (cnclip/commands/zeroshot.py)."""

import sys

from cnclip.commands.zeroshot import main

if __name__ == "__main__":
    sys.exit(main())
