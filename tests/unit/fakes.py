"""Test doubles shared by unit tests."""

from __future__ import annotations


class FakeTime:
    """An epoch clock that moves only when someone sleeps, recording every sleep."""

    def __init__(self, start: float = 1_795_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
