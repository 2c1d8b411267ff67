"""Failure reasons that cross the wire: one short line, no local paths.

A reason travels from a robot owner's node to the server and lands in ``metrics.jsonl``
and ``audit.jsonl``. A raw traceback there is kilobytes long and names the owner's
directories; the server needs only which error it was. Pure string work (no torch, no
Flower), so the fast paths and both sides can use it.
"""

from __future__ import annotations

import re

CLIENT_ERROR = 100  # Error.code of a node's failed reply (or failed carried evaluation); its reason is one line
_SEP = r"(?:/(?!/)|\\{1,2}(?!\\))"  # "/" but not "//" (URLs), "\" or an escaped "\\" (Windows)
_PATH = re.compile(rf"""(?<![\w.~/\\])(?:~|[A-Za-z]:)?(?:{_SEP}[^\s/\\'"`<>|:;,()\[\]{{}}]+)+{_SEP}?""")
_FRAME = re.compile(r'((?: *\|)?)( +)File "')  # a traceback frame: (margin of a group's "|", indent)
_SEPARATORS = re.compile(_SEP)


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one line of at most ``limit`` characters, with local paths cut to their last part.

    For a traceback the meaningful part is what follows the last frame: ``ExcType: message``.
    Otherwise it is the first non-blank line.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    line = " ".join(_PATH.sub(_last_part, _meaningful(text)).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_reason(err: BaseException, limit: int = 300) -> str:
    """``ExcType: message`` of ``err`` as :func:`one_line` makes it."""
    return one_line(f"{type(err).__name__}: {err}", limit)


def _meaningful(text: str) -> str:
    """The line that says what went wrong (the exception after a traceback's last frame)."""
    lines = [line for line in text.splitlines() if line.strip()]
    frames = [(i, match) for i, line in enumerate(lines) if (match := _FRAME.match(line))]
    if not frames:
        return lines[0] if lines else ""
    last, frame = frames[-1]
    margin, indent = frame.group(1), len(frame.group(2))
    for i in range(last + 1, len(lines)):  # the first line indented less than the frames starts the exception
        body = lines[i].removeprefix(margin)
        if len(body) - len(body.lstrip(" ")) < indent:
            return " ".join([body, *lines[i + 1:]])
    return lines[-1]


def _last_part(match: re.Match[str]) -> str:
    """A path's file or folder name: enough to tell which one, nothing of the owner's layout."""
    parts = [p for p in _SEPARATORS.split(match.group()) if p]
    return parts[-1] if parts else match.group()
