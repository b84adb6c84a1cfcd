"""`python -m cnclip SUBCOMMAND ...`: the same as the `cnclip` console script."""

import sys

from cnclip.commands import main

sys.exit(main())
