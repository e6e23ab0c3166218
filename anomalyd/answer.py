"""A reply from the store's writer thread to whoever handed it a command and waits (a control-channel
client, a dashboard request): the command carries an `Answer`, the writer calls it once."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Answer(Generic[T]):
    def __init__(self) -> None:
        self._done = threading.Event()
        self._outcome: tuple[T, str] | None = None

    def __call__(self, value: T, refused: str) -> None:
        """The writer's outcome: `value`, or the reason it was refused (then `value` says how things are)."""
        self._outcome = (value, refused)
        self._done.set()

    def wait(self, timeout: float) -> tuple[T, str] | None:
        """(value, refusal; "" when done), or None when the writer did not answer within `timeout`."""
        return self._outcome if self._done.wait(timeout) else None
