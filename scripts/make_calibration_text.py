"""Build compress' default calibration text (compress/calib/default_calibration.txt.gz), once, offline.

The text is the documentation strings of a fixed list of standard-library modules (their classes and functions
too), in a fixed order: English technical prose that ships with every Python, so no download is needed. It must
never overlap the text the reports evaluate on (``pydoc_data/topics.py``, the Language Reference): any docstring
sharing a 10-word run with it is dropped. The file is committed, so the calibration text does not change with
the Python version that runs compress; this script documents how it was made (run it again only on purpose).

    python scripts/make_calibration_text.py
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import io
import pydoc_data.topics
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "compress" / "calib" / "default_calibration.txt.gz"
_NAMES = (
    "argparse asyncio base64 bisect calendar collections concurrent.futures configparser contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fractions functools gettext glob gzip hashlib heapq hmac html "
    "http.client http.server imaplib inspect io ipaddress itertools json logging lzma mailbox math multiprocessing "
    "numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib pprint queue random re sched "
    "secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl statistics string struct "
    "subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback typing unittest urllib.parse "
    "urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo"
)
MODULES = tuple(_NAMES.split())
MIN_CHARS = 200  # docstrings shorter than this are mostly signatures
SHINGLE = 10


def shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def documented(module: object) -> list[object]:
    """The module, its public classes and functions, and the public methods of those classes, in name order."""
    name = getattr(module, "__name__", "")
    objs: list[object] = [module]
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        if inspect.isfunction(value):
            objs.append(value)
        elif inspect.isclass(value):
            objs.append(value)
            objs += [v for k, v in sorted(vars(value).items()) if not k.startswith("_") and inspect.isfunction(v)]
    return objs


def main() -> None:
    evaluated = shingles("\n".join(pydoc_data.topics.topics.values()))
    seen: set[str] = set()
    parts: list[str] = []
    dropped = 0
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in documented(module):
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < MIN_CHARS or doc in seen:
                continue
            seen.add(doc)
            if shingles(doc) & evaluated:
                dropped += 1
                continue
            parts.append(doc)
    text = "\n\n".join(parts) + "\n"
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    OUT.write_bytes(buffer.getvalue())
    print(f"{OUT}: {len(parts)} docstrings, {len(text):,} characters ({dropped} dropped for overlapping the "
          f"evaluation text), sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
