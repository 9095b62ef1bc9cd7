"""The cancel question a running job asks: how often it asks, and where it starts counting."""

from __future__ import annotations

import time

from tasks.cancel_check import CancelCheck


class Flag:
    def __init__(self):
        self.asked = 0
        self.value = False

    def __call__(self) -> bool:
        self.asked += 1
        return self.value


def test_asks_at_once_then_at_most_every_interval():
    flag = Flag()
    check = CancelCheck(flag, interval=60)
    assert check() is False and flag.asked == 1
    flag.value = True
    assert check() is False and flag.asked == 1  # within the interval: the last answer stands


def test_a_flag_read_at_the_start_of_the_job_spares_the_first_ask():
    """The job's first round trip already read the flag: asking again right after would cost the
    first token a second round trip for nothing."""
    flag = Flag()
    check = CancelCheck(flag, interval=0.05, read_at=time.monotonic())
    assert check() is False and flag.asked == 0
    flag.value = True
    time.sleep(0.06)
    assert check() is True and flag.asked == 1


def test_the_deadline_cancels_without_asking():
    flag = Flag()
    check = CancelCheck(flag, interval=60, deadline=time.monotonic() - 1, read_at=time.monotonic())
    assert check() is True and check.timed_out and flag.asked == 0
