"""Budget windows: periods in a local time zone across month ends and daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from extguard.budget.windows import Window, period_at

BERLIN = ZoneInfo("Europe/Berlin")
TOKYO = ZoneInfo("Asia/Tokyo")


def test_month_rolls_over_at_local_midnight() -> None:
    # 2026-11-30 23:30 UTC is already 2026-12-01 08:30 in Tokyo.
    before = period_at(Window.MONTH, datetime(2026, 11, 30, 14, 59, 59, tzinfo=UTC), TOKYO)
    after = period_at(Window.MONTH, datetime(2026, 11, 30, 15, 0, 0, tzinfo=UTC), TOKYO)

    assert before.id == "month:2026-11"
    assert after.id == "month:2026-12"
    assert before.end == after.start
    assert after.start == datetime(2026, 11, 30, 15, 0, tzinfo=UTC)


def test_month_end_in_december() -> None:
    period = period_at(Window.MONTH, datetime(2026, 12, 31, 12, tzinfo=UTC), BERLIN)

    assert period.id == "month:2026-12"
    assert period.end == datetime(2026, 12, 31, 23, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "hours"),
    [
        (datetime(2026, 3, 29, 12, tzinfo=UTC), 23),  # clocks go forward in Berlin
        (datetime(2026, 10, 25, 12, tzinfo=UTC), 25),  # clocks go back
        (datetime(2026, 12, 4, 12, tzinfo=UTC), 24),
    ],
)
def test_day_length_follows_local_calendar(moment: datetime, hours: int) -> None:
    period = period_at(Window.DAY, moment, BERLIN)

    assert period.seconds == hours * 3600


def test_repeated_hour_is_two_periods() -> None:
    first = period_at(Window.HOUR, datetime(2026, 10, 25, 0, 30, tzinfo=UTC), BERLIN)
    second = period_at(Window.HOUR, datetime(2026, 10, 25, 1, 30, tzinfo=UTC), BERLIN)

    assert first.id != second.id
    assert first.id.startswith("hour:2026-10-25T02")
    assert second.id.startswith("hour:2026-10-25T02")


def test_week_is_iso_monday_to_sunday() -> None:
    period = period_at(Window.WEEK, datetime(2026, 12, 6, 22, 59, tzinfo=UTC), BERLIN)  # Sunday 23:59 local

    assert period.id == "week:2026-W49"
    assert period.start == datetime(2026, 11, 29, 23, 0, tzinfo=UTC)
    assert period.end == datetime(2026, 12, 6, 23, 0, tzinfo=UTC)


def test_seconds_left_until_reset() -> None:
    now = datetime(2026, 12, 4, 22, 59, 30, tzinfo=UTC)
    period = period_at(Window.DAY, now, BERLIN)

    assert period.seconds_left(now) == 30


def test_naive_datetime_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        period_at(Window.DAY, datetime(2026, 12, 4), BERLIN)
