"""``python -m fmhub``: the commands git runs go straight to `fmhub_filters.commands`, everything else to the CLI.

git starts the filter once per command: importing the CLI (typer, rich) would cost more than a small clean.
"""

import sys


def main() -> None:
    from fmhub_filters import commands as gitcmd

    argv = sys.argv[1:]
    status = gitcmd.run(argv)
    if status is not None:
        sys.exit(status)
    from fmhub.cli import main as cli_main

    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
