"""One JSON decoder for every data format: hostile annotation files fail as a named problem, never as a crash.

`json.loads` alone lets three kinds of input escape the `ValueError` / `JSONDecodeError` the readers catch:

- nesting: `[[[[...` 100,000 deep raises `RecursionError` (and a deep structure costs stack and time before it does);
- huge integers: a 5,000-digit integer raises a plain `ValueError` from `int()` (Python's limit on integer string
  conversion), and below that limit converting one costs time quadratic in its length;
- bytes that are not UTF-8 raise `UnicodeDecodeError`.

:func:`parse_json` checks all three and raises :class:`JSONProblem` (a `ValueError`) whose message says what is
wrong and which limit applies; callers put the file, line or record in front. Limits (environment variables):

- `MMGEM_MAX_JSON_DEPTH` (default 100): arrays and objects nested at most this deep. The data formats nest 4 levels.
- `MMGEM_MAX_JSON_INT_DIGITS` (default 4300, Python's default): digits of one integer literal, counted as
  `sys.set_int_max_str_digits` counts them (the sign is not a digit); 0 means no limit.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAX_DEPTH = 100
DEFAULT_MAX_INT_DIGITS = 4300
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(code for code in range(256) if code not in b"[]{}")


class JSONProblem(ValueError):
    """JSON that cannot be used as data: malformed, not UTF-8, nested too deep or holding a too-long integer."""


def _limit(variable: str, default: int) -> int:
    value = os.environ.get(variable)
    if value is None or value == "":
        return default
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{variable} must be an integer; got {value!r}.") from None
    if limit < 0:
        raise ValueError(f"{variable} must be >= 0; got {value!r}.")
    return limit


def max_depth() -> int:
    """How deep arrays and objects may nest (`MMGEM_MAX_JSON_DEPTH`, at least 1)."""
    return max(1, _limit("MMGEM_MAX_JSON_DEPTH", DEFAULT_MAX_DEPTH))


def max_int_digits() -> int:
    """Digits allowed in one integer literal (`MMGEM_MAX_JSON_INT_DIGITS`; 0: no limit)."""
    return _limit("MMGEM_MAX_JSON_INT_DIGITS", DEFAULT_MAX_INT_DIGITS)


def decode_utf8(data: bytes | bytearray | str) -> str:
    """`data` as text; bytes that are not UTF-8 raise a :class:`JSONProblem` naming the first bad byte's offset."""
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as error:
        bad = bytes(data)[error.start : error.start + 1]
        raise JSONProblem(f"invalid UTF-8 (byte 0x{bad.hex()} at offset {error.start}; expected UTF-8 text)") from None


def nesting_depth(text: str) -> int:
    """How deep the arrays and objects of JSON `text` nest (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") == 0:
        return 0
    brackets = _STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _int_parser(limit: int):
    def parse_int(literal: str) -> int:
        digits = len(literal) - (literal[0] == "-")
        if limit and digits > limit:
            raise JSONProblem(
                f"an integer with {digits:,} digits (at most {limit:,} allowed, MMGEM_MAX_JSON_INT_DIGITS)"
            )
        try:
            return int(literal)
        except ValueError:  # over Python's own limit (sys.set_int_max_str_digits) when ours is higher or off
            raise JSONProblem(
                f"an integer with {digits:,} digits (over Python's limit, sys.set_int_max_str_digits)"
            ) from None

    return parse_int


def parse_json(data: bytes | bytearray | str) -> Any:
    """Decode one JSON document (UTF-8 bytes or text) within the limits of the module docstring.

    Raises:
        JSONProblem: the problem in words ("malformed JSON (Expecting value at line 1 column 5)", "nested 100,000
            levels deep (at most 100 allowed, MMGEM_MAX_JSON_DEPTH)", ...), without the file or line, which the
            caller knows.
    """
    text = decode_utf8(data)
    limit = max_depth()
    if text.count("[") + text.count("{") > limit:  # cheap bound first: most records have a few brackets
        depth = nesting_depth(text)
        if depth > limit:
            raise JSONProblem(f"nested {depth:,} levels deep (at most {limit:,} allowed, MMGEM_MAX_JSON_DEPTH)")
    digits = max_int_digits()
    # The integer hook costs a Python call per integer: only used when a digit run is long enough to need it (ours,
    # or Python's own limit when ours is off).
    threshold = digits or sys.get_int_max_str_digits()
    hook = _int_parser(digits) if threshold and re.search(rf"\d{{{threshold + 1}}}", text) else None
    try:
        return json.loads(text, parse_int=hook)
    except json.JSONDecodeError as error:
        raise JSONProblem(f"malformed JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:  # only if the interpreter's stack is smaller than the depth limit
        raise JSONProblem(f"nested too deep for this interpreter (MMGEM_MAX_JSON_DEPTH is {limit})") from None


def read_json_file(path: str | os.PathLike[str]) -> Any:
    """A JSON file's content; a problem raises a :class:`JSONProblem` that starts with the path."""
    try:
        return parse_json(Path(path).read_bytes())
    except JSONProblem as error:
        raise JSONProblem(f"{path}: {error}") from None


__all__ = ["JSONProblem", "decode_utf8", "max_depth", "max_int_digits", "nesting_depth", "parse_json", "read_json_file"]
