"""Commits that wait for the budget store, in memory and optionally in a local file.

The spool is a bounded queue, oldest first. When the store is down, a full spool drops its
oldest record (counted and logged), so memory stays bounded during a long outage.

With a file (`tenancy.store.spool_file`), every spooled record is also appended to it as one JSON
line, so usage survives a restart or a crash of the replica while the store is down. The file is
removed when the spool is empty again and rewritten from memory at shutdown. After a crash it
may still list records that were replayed before the crash. Replaying them again is harmless,
because the store counts a commit once per reservation id for COMMIT_MARKER_TTL_S.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Awaitable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from extguard.budget.store import BudgetStore, Counter, LedgerEntry

log = logging.getLogger("extguard.budget")


@dataclass(frozen=True, slots=True)
class SpooledCommit:
    """One commit that waits for the store."""

    reservation_id: str
    counters: list[Counter]
    amounts: dict[str, int]
    tenant: str
    ledger: LedgerEntry | None

    def send(self, store: BudgetStore) -> Awaitable[bool]:
        return store.commit(self.reservation_id, self.counters, self.amounts, tenant=self.tenant, ledger=self.ledger)

    def to_json(self) -> str:
        return json.dumps(
            {
                "reservation_id": self.reservation_id,
                "counters": [{**asdict(counter), "limits": dict(counter.limits)} for counter in self.counters],
                "amounts": self.amounts,
                "tenant": self.tenant,
                "ledger": None if self.ledger is None else asdict(self.ledger),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> SpooledCommit:
        """Parse one line of a spool file; raise ValueError (or KeyError, TypeError) when it is invalid."""
        raw: dict[str, Any] = json.loads(line)
        ledger = raw["ledger"]
        return cls(
            reservation_id=str(raw["reservation_id"]),
            counters=[Counter(**counter) for counter in raw["counters"]],
            amounts={str(name): int(amount) for name, amount in raw["amounts"].items()},
            tenant=str(raw["tenant"]),
            ledger=None if ledger is None else LedgerEntry(**ledger),
        )


class Spool:
    """Bounded queue of commits, oldest first, mirrored to `path` when one is given."""

    def __init__(self, max_records: int, path: str | None = None) -> None:
        self.max_records = max_records
        self.path = Path(path) if path else None
        self.dropped = 0
        self._records: collections.deque[SpooledCommit] = collections.deque()
        self._file_lines = 0  # lines in the file, replayed ones included
        self._write_failed = False  # logged once until a write succeeds again

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[SpooledCommit]:
        return iter(self._records)

    def first(self) -> SpooledCommit:
        return self._records[0]

    def append(self, record: SpooledCommit) -> bool:
        """Add a record; return False when the spool was full and its oldest record was dropped."""
        if self.max_records == 0:  # spooling is off: the record itself is dropped
            self.dropped += 1
            return False
        kept = True
        if len(self._records) >= self.max_records:
            self._records.popleft()
            self.dropped += 1
            kept = False
        self._records.append(record)
        if self.path is not None:
            if self._file_lines >= 2 * self.max_records:
                self.save()  # drop replayed and dropped records from the file
            else:
                self._write([record], mode="a")
        return kept

    def pop_first(self) -> None:
        """Drop the oldest record after it was committed; remove the file once nothing is left."""
        self._records.popleft()
        if not self._records:
            self.save()

    def load(self) -> int:
        """Read the records a previous process left in the file; return how many were read.

        Invalid lines (a line cut short by a crash, for example) are skipped and logged once.
        """
        if self.path is None or not self.path.exists():
            return 0
        invalid = 0
        loaded = 0
        with self.path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = SpooledCommit.from_json(line)
                except (ValueError, KeyError, TypeError):
                    invalid += 1
                    continue
                self._records.append(record)
                loaded += 1
        while len(self._records) > self.max_records:
            self._records.popleft()
            self.dropped += 1
        if invalid:
            log.error("budget spool file %s: %d invalid lines skipped", self.path, invalid)
        self.save()
        return loaded

    def save(self) -> None:
        """Rewrite the file from memory, or remove it when the spool is empty."""
        if self.path is None:
            return
        if not self._records:
            self.path.unlink(missing_ok=True)
            self._file_lines = 0
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        self._file_lines = 0
        if self._write(list(self._records), mode="w", target=temporary):
            os.replace(temporary, self.path)

    def check_folder(self) -> None:
        """Raise OSError when the spool file's folder does not exist or is not writable."""
        if self.path is None:
            return
        folder = self.path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise OSError(f"tenancy.store.spool_file: the folder {folder} does not exist or is not writable")

    @property
    def saved(self) -> bool:
        """Whether the file contains every record in memory (True without records to save)."""
        return not self._records or (self.path is not None and not self._write_failed)

    def _write(self, records: list[SpooledCommit], mode: str, target: Path | None = None) -> bool:
        destination = target or self.path
        assert destination is not None
        try:
            with destination.open(mode, encoding="utf-8") as file:
                file.writelines(record.to_json() + "\n" for record in records)
        except OSError as error:
            if not self._write_failed:
                log.error("budget spool file %s could not be written (%s); usage is kept in memory only until a write succeeds", destination, error)
            self._write_failed = True
            return False
        self._write_failed = False
        self._file_lines += len(records)
        return True
