"""The `compress` command's entry point: answers what needs no model code (``--version``) at once, and turns a
Ctrl-C that arrives while the libraries load (torch takes seconds) into the same one line as later."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:
        from compress import __version__

        print(f"compress, version {__version__}")
        return 0
    try:
        from compress.cli import main as run
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
