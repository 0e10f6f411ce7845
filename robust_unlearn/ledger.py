"""The results ledger: ``results.jsonl``, one JSON object a line, one row per metric of a cell.

An append (a cell's rows) is one ``write`` of complete lines followed by fsync, so a killed process
leaves either none or all of them; a crash mid-write leaves at most a torn last line. Reading never
changes the file: a torn or unparseable line is skipped with a warning naming the file and line
(``problems`` lists them) and every valid row, before or after it, is kept. The next append drops a
torn last line (an unfinished write, never a row) before writing, so a new row is never glued onto it.
Rows are keyed by (model, method, compression, split, metric, ckpt, eval) and a column's settings (a
GPTQ / AWQ column's calibration, a relearn column's attack): a re-run skips cells already there, and a
cell evaluated again with other settings adds rows, the newest of which ``latest`` reads.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
KEY = ("model", "method", "compression", "split", "metric", "ckpt", "eval")
REQUIRED = ("model", "method", "compression", "metric", "value")  # what a report needs of every row


def row_key(row: dict) -> tuple:
    settings = row.get("settings")
    return tuple(row.get(k) for k in KEY) + ((json.dumps(settings, sort_keys=True),) if settings else ())


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._rows: list[dict] | None = None
        self.problems: list[tuple[int, str]] = []  # (line number, why it was skipped), from the last read

    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = self._read()
        return list(self._rows)

    def _read(self) -> list[dict]:
        self.problems = []
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        rows = []
        for n, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.strip():
                continue
            why = _problem(line)
            if why is None:
                rows.append(json.loads(line))
                continue
            self.problems.append((n, why))
            log.warning("%s line %d: %s, skipped", self.path, n, why)
        return rows

    def keys(self) -> set[tuple]:
        return {row_key(r) for r in self.rows()}

    def has_all(self, rows_like: list[dict]) -> bool:
        keys = self.keys()
        return all(row_key(r) in keys for r in rows_like)

    def append(self, rows: list[dict]) -> int:
        """Append rows not already present; -> number written."""
        keys = self.keys()
        new = [r for r in rows if row_key(r) not in keys]
        if not new:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self._mend_tail() + "".join(json.dumps(r, sort_keys=True) + "\n" for r in new).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            done = os.write(fd, data)  # one write: all of the rows land together
            while done < len(data):  # a short write (full disk, signal): finish it, never drop rows
                done += os.write(fd, data[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rows = (self._rows or []) + new
        return len(new)

    def _mend_tail(self) -> bytes:
        """Before an append: a last line without its newline is an unfinished write. Not a row: cut
        it off (nothing else is touched); a whole row that only lacks the newline: keep it and return
        the newline to write first. -> bytes to write before the new rows."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return b""
        if size == 0:
            return b""
        with open(self.path, "r+b") as fh:
            start, tail = size, b""
            while start > 0:  # back to the last newline
                step = min(65536, start)
                fh.seek(start - step)
                chunk = fh.read(step)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    tail = chunk[cut + 1:] + tail
                    start = start - step + cut + 1
                    break
                tail = chunk + tail
                start -= step
            if not tail:
                return b""
            if _problem(tail) is None:
                return b"\n"
            fh.truncate(start)
            fh.flush()
            os.fsync(fh.fileno())
        log.warning("%s: dropped a torn last line (%d bytes: an interrupted write) before appending", self.path,
                    len(tail))
        return b""

    def latest(self) -> list[dict]:
        """The newest row per (model, method, compression, split, metric)."""
        out: dict[tuple, dict] = {}
        for r in self.rows():
            out[row_key(r)[:5]] = r
        return list(out.values())


def _problem(line: bytes) -> str | None:
    """Why ``line`` is not a ledger row, or None when it is one."""
    torn = not line.endswith(b"\n")
    try:
        row = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return ("torn row (no newline at the end: an interrupted write)" if torn
                else "not valid JSON (expected one ledger row a line)")
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__} (expected one ledger row a line)"
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        return f"row without {', '.join(repr(k) for k in missing)}"
    return None
