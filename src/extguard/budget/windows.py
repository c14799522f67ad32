"""Budget windows: calendar periods in a configured time zone, and their ids and reset times.

A window is the period that contains a moment: the minute, hour, day, ISO week (Monday to
Sunday) or calendar month, in local time of the policy's time zone. Days and months follow the
local calendar across daylight-saving changes, so a day can last 23 or 25 hours. The window id
names the period in local time ("day:2026-12-04", "week:2026-W49", "month:2026-12") and is part
of the store's key, so a new period starts from zero without any reset job. Minute and hour ids
carry the UTC offset, because the hour that repeats when clocks go back is two periods.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo


_UTC = ZoneInfo("UTC")


class Window(enum.StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Period:
    """One occurrence of a window: its id, and its start and end as aware datetimes (end exclusive)."""

    window: Window
    id: str
    start: datetime
    end: datetime

    def seconds_left(self, now: datetime) -> int:
        """Return the whole seconds from `now` until the period ends, at least 1."""
        # Subtracting in UTC: aware datetimes of one zone subtract as wall times, which is wrong
        # across a daylight-saving change.
        remaining = self.end.astimezone(_UTC) - now.astimezone(_UTC)
        return max(1, int(remaining.total_seconds() + 0.999))

    @property
    def seconds(self) -> int:
        """Return the length of the period in seconds (a local day can last 23 or 25 hours)."""
        return int((self.end.astimezone(_UTC) - self.start.astimezone(_UTC)).total_seconds())


def period_at(window: Window, now: datetime, zone: ZoneInfo) -> Period:
    """Return the period of `window` that contains the aware datetime `now`, in `zone`'s calendar."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    local = now.astimezone(zone)
    if window is Window.MINUTE:
        start = local.replace(second=0, microsecond=0)
        return Period(window, f"minute:{start:%Y-%m-%dT%H:%M%z}", start, _add_wall(start, minutes=1, zone=zone))
    if window is Window.HOUR:
        start = local.replace(minute=0, second=0, microsecond=0)
        return Period(window, f"hour:{start:%Y-%m-%dT%H%z}", start, _add_wall(start, hours=1, zone=zone))
    if window is Window.DAY:
        start = _local_midnight(local.year, local.month, local.day, zone)
        following = local.date() + timedelta(days=1)
        end = _local_midnight(following.year, following.month, following.day, zone)
        return Period(window, f"day:{local:%Y-%m-%d}", start, end)
    if window is Window.WEEK:
        monday = local.date() - timedelta(days=local.weekday())
        next_monday = monday + timedelta(days=7)
        year, week, _ = monday.isocalendar()
        start = _local_midnight(monday.year, monday.month, monday.day, zone)
        end = _local_midnight(next_monday.year, next_monday.month, next_monday.day, zone)
        return Period(window, f"week:{year}-W{week:02d}", start, end)
    if window is Window.MONTH:
        start = _local_midnight(local.year, local.month, 1, zone)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        return Period(window, f"month:{local:%Y-%m}", start, _local_midnight(year, month, 1, zone))
    raise ValueError(f"unknown window {window!r}")


def _local_midnight(year: int, month: int, day: int, zone: ZoneInfo) -> datetime:
    """Return the first moment of a local calendar day, also where midnight is skipped by DST."""
    naive = datetime(year, month, day)
    moment = naive.replace(tzinfo=zone)
    # A wall time in a DST gap does not exist; round trip through UTC moves it to a real moment.
    return moment.astimezone(_UTC).astimezone(zone)


def _add_wall(start: datetime, *, zone: ZoneInfo, hours: int = 0, minutes: int = 0) -> datetime:
    """Return `start` plus a span of elapsed time, for minute and hour windows (not calendar units)."""
    return (start.astimezone(_UTC) + timedelta(hours=hours, minutes=minutes)).astimezone(zone)
