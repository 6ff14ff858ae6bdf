"""The `compress` command's entry point: answers what needs no model code (``--version``) at once, and holds a
Ctrl-C that arrives while the libraries load (torch takes seconds) until they are loaded, then ends with the same
one line as later. (Raised inside torch's import, a KeyboardInterrupt can cross its C++ code and abort the process
with a C++ exception, or end it by SIGINT.)"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:
        from compress import __version__

        print(f"compress, version {__version__}")
        return 0
    received: list[int] = []
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # an ignored SIGINT stays ignored
    if ours:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        from compress.cli import main as run
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
