"""Tables for people and CSV/JSON for machines."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenreduce.errors import InvalidOptionError

__all__ = [
    "check_output_dir",
    "check_output_file",
    "format_table",
    "markdown_table",
    "write_results",
]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_results(rows: Sequence[dict[str, Any]], path: str | Path, fmt: str) -> None:
    """Write rows as CSV or JSON (a list of objects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(list(rows), indent=2) + "\n")
    elif fmt == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise InvalidOptionError(
            f"--results-format={fmt!r} is not accepted; accepted: 'csv', 'json'"
        )


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(option: str, path: str | Path | None) -> None:
    """A file path that can be written: not a folder, under a folder that exists or can be
    made. Checked before any work, so that a long run does not end in an error."""
    if path is None:
        return
    if str(path) == "":
        raise InvalidOptionError(f"{option} is an empty path; accepted: a file path")
    path = Path(path)
    if path.is_dir():
        raise InvalidOptionError(f"{option}={path} is a folder; accepted: a file path")
    _check_parent_is_folder(option, path)
    existed = path.exists()
    try:  # really open it: permission bits do not tell (root, read-only or virtual file systems)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab"):
            pass
    except OSError as err:
        raise InvalidOptionError(f"{option}={path} cannot be written: {err}") from err
    if not existed:
        path.unlink(missing_ok=True)  # under torchrun another rank may have removed it


def check_output_dir(option: str, path: str | Path) -> None:
    """A folder path that exists or can be made (not an existing file), checked before work."""
    if str(path) == "":
        raise InvalidOptionError(f"{option} is an empty path; accepted: a folder path")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidOptionError(f"{option}={path} is an existing file; accepted: a folder path")
    _check_parent_is_folder(option, path)
    probe = path / f".tokenreduce-write-test-{os.getpid()}"
    try:  # the folder is made now, as the command would make it; a file in it must be writable
        path.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise InvalidOptionError(f"{option}={path} cannot be written: {err}") from err


def _check_parent_is_folder(option: str, path: Path) -> None:
    """The nearest existing ancestor must be a folder (writability: the write probes below)."""
    base = _first_existing(path.parent if not path.is_dir() else path)
    if not base.is_dir():
        raise InvalidOptionError(f"{option}={path}: {base} is a file, not a folder")


def markdown_table(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A markdown table: a header of `columns`, then one line per row of `cells` (text)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"
