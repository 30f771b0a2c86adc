"""`--out FILE` options: the file a command writes, checked when the command line is read.

A folder given where a file is meant, a missing parent folder or a file name without the
expected suffix is refused before anything is made, naming a file that would do. This module
only checks names: it never creates, writes or removes anything.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def out_file(example: str, suffix: str = "") -> Callable[[str], Path]:
    """An argparse `type=` for a file to write: `example` is a file name that would do
    (e.g. `audit.key`), `suffix` the one the name must end in, if any."""

    def parse(text: str) -> Path:
        path = Path(text)
        if text.endswith("/") or path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text}: a folder; name the file to write, e.g. {path / example}"
            )
        if suffix and path.suffix != suffix:
            instead = path / example if not path.suffix else path.with_suffix(suffix)
            raise argparse.ArgumentTypeError(
                f"{text}: the file name must end in {suffix}, e.g. {instead}"
            )
        if not path.parent.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text}: the folder {path.parent} does not exist; make it first"
            )
        return path

    return parse
