"""Opening untrusted files: only regular files, and every size checked before anything is allocated.

A FIFO, a device (`/dev/zero`), a socket or a directory where a file belongs is refused by name before it is opened
(opened with O_NONBLOCK and checked again on the descriptor, so a file swapped for a FIFO in between cannot block
either). Sizes are checked against `advanced.limits` (`Limits`): a refusal names the limit and the setting that
raises it (defaults: sanitizer/config.py, AdvancedLimits). Names that reach a terminal, a CSV or a file name pass one rule (`check_name`).
"""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path
from typing import BinaryIO

from sanitizer.config import AdvancedLimits as Limits
from sanitizer.errors import SanitizeError

MB = 1 << 20


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


def regular_file(path: Path, fix: str) -> os.stat_result:
    """stat(path), following links, refusing anything but a regular file: `fix` says what to put there instead."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SanitizeError(f"{path}: not found (or a broken link); {fix}") from None
    except OSError as err:  # a link loop, a name too long, no permission
        raise SanitizeError(f"{path}: cannot be read ({err.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SanitizeError(f"{path}: is {_kind(st.st_mode)}, not a regular file; {fix}")
    return st


def check_size(path: Path, size: int, limit_mb: float, setting: str) -> None:
    """`setting`: where the limit comes from and how to raise it."""
    if size > limit_mb * MB:
        raise SanitizeError(f"{path}: {size / MB:,.2f} MB is over the {limit_mb:,.2f} MB limit ({setting})")


def open_regular(path: Path, limit_mb: float, setting: str, fix: str) -> BinaryIO:
    """A binary file object on `path`, a regular file of at most `limit_mb`, checked on the descriptor itself."""
    check_size(path, regular_file(path, fix).st_size, limit_mb, setting)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        raise SanitizeError(f"{path}: cannot be opened ({err.strerror}); {fix}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # swapped after the stat above
        os.close(fd)
        raise SanitizeError(f"{path}: is {_kind(st.st_mode)}, not a regular file; {fix}")
    try:
        check_size(path, st.st_size, limit_mb, setting)
    except SanitizeError:
        os.close(fd)
        raise
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, limit_mb: float, setting: str, fix: str) -> bytes:
    """The bytes of a regular file of at most `limit_mb` (never more, should it grow while read)."""
    with open_regular(path, limit_mb, setting, fix) as fh:
        data = fh.read(min(os.fstat(fh.fileno()).st_size, int(limit_mb * MB)) + 1)  # read(n) reserves n bytes
    check_size(path, len(data), limit_mb, setting)
    return data


def check_decoded(where: str, decoded_bytes: int, stored_bytes: int | None, limits: Limits) -> None:
    """Refuse, before decoding, data whose declared size is over max_decoded_mb or, when `stored_bytes` is known
    (compressed), more than max_expansion times what it takes on disk."""
    if decoded_bytes > limits.max_decoded_mb * MB:
        raise SanitizeError(f"{where}: declares {decoded_bytes / MB:,.0f} MB of pixels, over the "
                            f"{limits.max_decoded_mb:,g} MB limit (advanced.limits.max_decoded_mb); raise it if the "
                            "data is genuine")
    if stored_bytes is not None and decoded_bytes > limits.max_expansion * max(stored_bytes, 1):
        raise SanitizeError(f"{where}: {stored_bytes / MB:,.2f} MB on disk would expand to {decoded_bytes / MB:,.0f} "
                            f"MB ({decoded_bytes / max(stored_bytes, 1):,.0f}x, over advanced.limits.max_expansion "
                            f"{limits.max_expansion:g}): a compression bomb, or data flat enough to need that limit "
                            "raised")


def check_count(where: str, n: int, limits: Limits) -> None:
    if n > limits.max_samples:
        raise SanitizeError(f"{where}: {n:,} samples, over the {limits.max_samples:,} limit "
                            "(advanced.limits.max_samples); raise it if the data is genuine")


# Unicode categories never allowed in a name: controls (Cc), format characters (Cf: bidi overrides, zero-width
# joiners), surrogates, private use and unassigned code points, line and paragraph separators.
_FORBIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
MAX_NAME = 255


FORMULA_STARTS = ("=", "+", "-", "@")  # a spreadsheet opening a CSV runs a cell starting so as a formula


def control_character(text: str) -> str | None:
    """The first character of `text` a terminal, CSV or HTML reader could be fooled by (controls, bidi overrides,
    zero-width and other invisible characters, line breaks), described; None when there is none."""
    bad = next((ch for ch in text if unicodedata.category(ch) in _FORBIDDEN or (ch.isspace() and ch != " ")), None)
    return None if bad is None else f"U+{ord(bad):04X} ({unicodedata.name(bad, 'unnamed')})"


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a sample id or class name (None: it can): every name is printed to terminals, written to
    CSV and HTML, and some become file names."""
    if not name or not name.strip():
        return "it is empty"
    if len(name) > MAX_NAME:
        return f"it is over {MAX_NAME} characters"
    if name != name.strip():
        return "it starts or ends with white space"
    if name.startswith(FORMULA_STARTS):
        return f"it starts with {name[0]!r}, which a spreadsheet runs as a formula"
    bad = control_character(name)
    return None if bad is None else f"it holds the control or invisible character {bad}"


def csv_text(text: str) -> str:
    """Free text (a reviewer's note) as a CSV cell a spreadsheet shows and does not run (OWASP: CSV injection)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def from_csv_text(cell: str) -> str:
    """`csv_text`'s inverse."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


def check_names(names, what: str, where: str, fix: str) -> None:
    """Every name passes `name_problem` and no two are equal; else one line naming the first offender (escaped)."""
    seen = set()
    for name in names:
        problem = name_problem(name) if isinstance(name, str) else f"it is a {type(name).__name__}, not text"
        if problem is None and name in seen:
            problem = "it appears twice"
        if problem:
            raise SanitizeError(f"{where}: {what} {ascii(name)[:120]} cannot be used: {problem}; {fix}")
        seen.add(name)
