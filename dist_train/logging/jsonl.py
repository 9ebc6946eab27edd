"""JSON-lines files of the run directory (metrics.jsonl, sample_ids.rank<r>.jsonl)."""
from __future__ import annotations

import json
import os
from typing import Iterator


def trim_jsonl(path: str, max_step: int) -> int:
    """Drop the records with ``"step" > max_step`` from a JSON-lines log, in place.

    Logs are appended in step order and every resume trims them, so the records to drop are a
    suffix: the file is truncated at the first one (one syscall; a writer holding the file open
    in append mode keeps appending at the new end). Returns the number of lines dropped.
    """
    if not os.path.isfile(path):
        return 0
    offset, cut, dropped = 0, None, 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                drop = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > max_step
            except ValueError:
                drop = True  # a torn last line of a killed process
            if cut is None and drop:
                cut = offset
            if cut is not None:
                dropped += 1
            offset += len(line)
    if cut is not None:
        os.truncate(path, cut)
    return dropped


def replace_last_line(path: str, line: str) -> None:
    """Put ``line`` in place of the file's last line, atomically: the file is copied with the new
    line to a temporary file renamed over it, so a crash leaves the old file or the new one, never
    a file without either line (a rare path: a rerun adds its evaluation to an earlier record)."""
    with open(path, "rb") as f:
        data = f.read()
        mode = os.fstat(f.fileno()).st_mode & 0o7777
    keep = data[:data.rstrip(b"\n").rfind(b"\n") + 1]
    tmp = f"{path}.tmp"  # (one writer per file: rank 0; a crash's leftover is overwritten)
    try:
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(keep + line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    from dist_train.checkpoint.layout import fsync_dir

    try:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError:  # (a directory that cannot be fsynced: the rename stands in the page cache)
        pass


def last_record(path: str):
    """The last JSON-object record of a JSON-lines log, or None."""
    found = None
    for found in records(path):
        pass
    return found


def records(path: str) -> Iterator[dict]:
    """The JSON-object records of a JSON-lines log, in order (none when it is absent or
    unreadable; a torn last line of a killed process is skipped)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
    except OSError:
        return


def last_step(path: str) -> int:
    """The largest ``"step"`` of a JSON-lines log (0 when it is absent or holds none)."""
    return max((r["step"] for r in records(path) if isinstance(r.get("step"), int)), default=0)


def last_value(path: str, key: str):
    """``key``'s value in the last record of a JSON-lines log that has it, or None."""
    found = None
    for record in records(path):
        if record.get(key) is not None:
            found = record[key]
    return found


def records_at(path: str, step: int, prefix: str) -> dict:
    """The keys starting with ``prefix`` (and their values) that the records of ``step`` hold in a
    JSON-lines log, later records winning; {} when none does."""
    found: dict = {}
    for record in records(path):
        if record.get("step") == step:
            found.update({k: v for k, v in record.items() if k.startswith(prefix)})
    return found
