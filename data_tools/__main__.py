"""`python -m data_tools ...` runs the same CLI as the `data_tools` console script."""

from data_tools.cli import main

if __name__ == "__main__":  # worker processes started with "spawn" re-import this module
    raise SystemExit(main())
