"""`python -m cnclip.finetune`: the same as `cnclip finetune` (cnclip/commands/finetune.py)."""

import sys

from cnclip.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
