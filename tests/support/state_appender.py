"""A second process appending to a shared audit store: ``python -m tests.support.state_appender
URL COUNT LABEL``. Prints ``ready``, waits for a line on stdin, appends COUNT records, prints
``done``. The password comes from ``PGPASSWORD``, never the command line."""

from __future__ import annotations

import sys

from portcullis.audit import AuditEntry
from portcullis.state import open_state_url


def main() -> int:
    """Append the records once told to go."""
    url, count, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    log = open_state_url(url).audit_log()
    log.records()  # connect (and create an SQLite schema) before saying ready
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        log.append(AuditEntry(event="test.concurrent", actor=label, details={"i": i}))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
