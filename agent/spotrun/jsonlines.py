"""Reading JSON-lines files: the local cloud's ledger, the agent's and trainer's event logs.

Each is appended to by another process while it is read, so the last line may be torn (no
newline yet) and is left out by default. What a line that is not a JSON object means is the
caller's choice: an error for a record-keeping file (the ledger), noise to skip in a log that
also carries other output. Stdlib only: the agent ships it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _syslog_body(line: str) -> str | None:
    # journald's "<N>" priority prefix (spotrun.log writes it); lines without one are not events.
    if line.startswith("<") and ">" in line[:4]:
        return line[line.index(">") + 1:]
    return None


def parse_jsonl(text: str, *, source: str = "<text>", skip_torn_last: bool = True,
                bad: str = "raise", skip_blank: bool = True,
                syslog_prefix: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of ``text``, one a line, in order.

    ``skip_torn_last``: a last line without its newline is left out (its writer is still at
    it). ``bad``: ``"raise"`` (ValueError naming ``source`` and the line number) or ``"skip"``
    for a line that is not a JSON object. ``skip_blank``: whitespace-only lines are passed over
    (otherwise they are bad lines). ``syslog_prefix``: lines are ``<N>{...}``; others skipped.
    """
    if bad not in ("raise", "skip"):
        raise ValueError(f"parse_jsonl: bad must be 'raise' or 'skip', not {bad!r}")
    lines = text.split("\n")
    # split() leaves what follows the last newline as the last item: "" when the text ends
    # with one, the torn line when not.
    lines = lines[:-1] if skip_torn_last or lines[-1] == "" else lines
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if syslog_prefix:
            body = _syslog_body(line)
            if body is None:
                continue
            line = body
        if skip_blank and not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if bad == "skip":
                continue
            raise ValueError(f"{source}: line {number} is not a JSON record: {exc}") from None
        if not isinstance(record, dict):
            if bad == "skip":
                continue
            raise ValueError(f"{source}: line {number} is not a JSON object")
        records.append(record)
    return records


def read_jsonl(path: str | Path, *, skip_torn_last: bool = True, bad: str = "raise",
               skip_blank: bool = True, syslog_prefix: bool = False,
               errors: str = "strict") -> list[dict[str, Any]]:
    """:func:`parse_jsonl` of the file at ``path``; a file not there yet holds no records.
    ``errors``: how undecodable bytes are read (``"replace"`` for logs with foreign output)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors=errors)
    except FileNotFoundError:
        return []
    return parse_jsonl(text, source=str(path), skip_torn_last=skip_torn_last, bad=bad,
                       skip_blank=skip_blank, syslog_prefix=syslog_prefix)
