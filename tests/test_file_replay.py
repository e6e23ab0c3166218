"""Replayed files through the one file reader, into a real inbox: nothing lost, nothing held back, real time
kept, unreadable files retried, stops prompt."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from anomalyd.config import FileSource, HealthConfig
from anomalyd.inbox import Inbox
from anomalyd.records import SourceState
from anomalyd.sources.base import AudioBlock, SourceMessage, SourceNotice
from anomalyd.sources.file import FAST_BLOCK_SECONDS, FileReader, FileReplay

RATE = 16_000
HEALTH = HealthConfig(retry_initial_seconds=0.1, retry_max_seconds=0.2)


def _write(path: Path, seconds: float, seed: int) -> npt.NDArray[np.float32]:
    audio = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)
    sf.write(path, audio, RATE, subtype="FLOAT")
    return audio


def _source(path: Path, **settings: object) -> FileSource:
    return FileSource.model_validate({"type": "file", "path": path, **settings})


class Taker:
    """A worker that takes everything from the inbox, as the daemon's does, keeping what each stream got."""

    def __init__(self, inbox: Inbox[str], pause: float = 0.0) -> None:
        self.inbox = inbox
        self.pause = pause
        self.audio: dict[str, list[AudioBlock]] = defaultdict(list)
        self.notices: dict[str, list[SourceNotice]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for item in self.inbox.take(0.05):
                if isinstance(item, AudioBlock):
                    self.audio[item.stream].append(item)
                elif isinstance(item, SourceNotice):
                    self.notices[item.stream].append(item)
            time.sleep(self.pause)

    def samples(self, stream: str) -> npt.NDArray[np.float32]:
        return np.concatenate([b.samples for b in self.audio[stream]])

    def states(self, stream: str) -> list[SourceState]:
        return [n.state for n in self.notices[stream]]

    def wait_for(self, done: object, timeout: float = 20.0) -> None:
        assert callable(done)
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


Rig = Callable[..., tuple[FileReader, Inbox[str], Taker]]


@pytest.fixture
def rig() -> Iterator[Rig]:
    """Makes a reader, an inbox that cues it, and a taker; stops them all after the test."""
    made: list[tuple[FileReader, Inbox[str], Taker]] = []

    def make(
        max_blocks: int = 50, stream_blocks: int = 2, pause: float = 0.0
    ) -> tuple[FileReader, Inbox[str], Taker]:
        reader = FileReader()
        inbox: Inbox[str] = Inbox(max_blocks=max_blocks, stream_blocks=stream_blocks, on_room=reader.room)
        made.append((reader, inbox, Taker(inbox, pause)))
        return made[-1]

    yield make
    for reader, _, taker in made:
        taker.stop()
        reader.close()


def test_many_fast_replays_arrive_whole_in_order_through_one_thread(tmp_path: Path, rig: Rig) -> None:
    reader, inbox, taker = rig(pause=0.005)  # a worker slower than the reader: offers refused, kept, retried
    audio = {f"s{i}": _write(tmp_path / f"s{i}.wav", 3.0 + 0.37 * i, seed=i) for i in range(40)}
    threads = threading.active_count()
    replays = [FileReplay(n, _source(tmp_path / f"{n}.wav", realtime=False), HEALTH, inbox.offer, reader)
               for n in audio]  # fmt: skip
    for replay in replays:
        replay.start()
    assert threading.active_count() <= threads + 1  # one reader, whatever the number of files
    taker.wait_for(lambda: all(taker.states(n)[-1:] == [SourceState.ENDED] for n in audio))
    for name, expected in audio.items():
        assert taker.states(name) == [SourceState.OK, SourceState.ENDED]
        np.testing.assert_array_equal(taker.samples(name), expected)  # nothing lost, nothing twice
        # FAST_BLOCK_SECONDS blocks when taken fast
        assert max(len(b.samples) for b in taker.audio[name]) == int(FAST_BLOCK_SECONDS * RATE)
    assert all(r.closed.wait(2.0) for r in replays)  # an ended replay is closed


def test_a_stream_that_finds_no_room_holds_no_other_back(tmp_path: Path) -> None:
    reader = FileReader()
    got: dict[str, int] = defaultdict(int)

    def offer(message: SourceMessage) -> bool:
        if isinstance(message, AudioBlock):
            if message.stream == "stuck":
                return False  # its worker never makes room
            got[message.stream] += len(message.samples)
        return True

    _write(tmp_path / "a.wav", 5.0, seed=1)
    stuck = FileReplay("stuck", _source(tmp_path / "a.wav", realtime=False), HEALTH, offer, reader)
    free = FileReplay("free", _source(tmp_path / "a.wav", realtime=False, loop=True), HEALTH, offer, reader)
    stuck.start()
    free.start()
    deadline = time.monotonic() + 10.0
    while got["free"] < 20 * 5 * RATE:  # the free one loops on at full speed: 100 s of audio
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stuck.stop(1.0)
    assert stuck.closed.is_set()  # a stop is served while the other replay still has all the room
    free.stop(1.0)
    assert free.closed.is_set()
    reader.close()


def test_real_time_replay_hands_each_block_on_when_its_audio_has_ended(tmp_path: Path, rig: Rig) -> None:
    reader, inbox, taker = rig(50, 50)
    expected = _write(tmp_path / "a.wav", 1.5, seed=3)
    started = time.monotonic()
    FileReplay("a", _source(tmp_path / "a.wav", block_seconds=0.25), HEALTH, inbox.offer, reader).start()
    taker.wait_for(lambda: taker.states("a")[-1:] == [SourceState.ENDED])
    np.testing.assert_array_equal(taker.samples("a"), expected)
    ends = np.cumsum([len(b.samples) for b in taker.audio["a"]]) / RATE
    received = np.array([b.received for b in taker.audio["a"]]) - started
    assert len(ends) == 6
    assert np.all(received >= ends - 0.02), (received, ends)  # never ahead of the audio
    assert received[-1] < ends[-1] + 1.0  # and not far behind it


def test_a_missing_or_broken_file_is_lost_retried_and_replayed_once_readable(
    tmp_path: Path, rig: Rig
) -> None:
    reader, inbox, taker = rig(50, 2)
    path = tmp_path / "later.wav"
    other = _write(tmp_path / "other.wav", 2.0, seed=4)
    FileReplay("later", _source(path, realtime=False), HEALTH, inbox.offer, reader).start()
    FileReplay("other", _source(tmp_path / "other.wav", realtime=False), HEALTH, inbox.offer, reader).start()
    taker.wait_for(lambda: len(taker.notices["later"]) >= 2)  # tried again, with back-off
    assert all(n.state == SourceState.LOST and "no such file" in n.detail for n in taker.notices["later"])
    taker.wait_for(lambda: taker.states("other")[-1:] == [SourceState.ENDED])  # the other file read on
    np.testing.assert_array_equal(taker.samples("other"), other)

    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVE not really")  # being copied in: still unreadable
    time.sleep(0.5)
    assert taker.states("later")[-1] == SourceState.LOST
    expected = _write(path, 2.0, seed=5)
    taker.wait_for(lambda: taker.states("later")[-1:] == [SourceState.ENDED])
    assert taker.states("later")[-2:] == [SourceState.OK, SourceState.ENDED]
    np.testing.assert_array_equal(taker.samples("later"), expected)


def test_a_looped_file_broken_between_passes_is_lost_then_replayed_again(tmp_path: Path, rig: Rig) -> None:
    reader, inbox, taker = rig(50, 2, 0.05)
    path = tmp_path / "loop.wav"
    _write(path, 1.0, seed=6)
    replay = FileReplay("loop", _source(path, realtime=False, loop=True), HEALTH, inbox.offer, reader)
    replay.start()
    taker.wait_for(lambda: len(taker.audio["loop"]) >= 3)
    path.write_bytes(b"garbage")
    taker.wait_for(lambda: SourceState.LOST in taker.states("loop"))
    _write(path, 1.0, seed=7)
    taker.wait_for(lambda: taker.states("loop")[-1] == SourceState.OK and len(taker.states("loop")) >= 3)
    assert SourceState.ENDED not in taker.states("loop")
    replay.stop(1.0)
    assert replay.closed.is_set()


def test_stopping_is_prompt_and_nothing_is_handed_on_after(tmp_path: Path, rig: Rig) -> None:
    reader, inbox, taker = rig(500, 2)
    _write(tmp_path / "a.wav", 2.0, seed=8)
    replays = [
        FileReplay(f"s{i}", _source(tmp_path / "a.wav", realtime=i % 2 == 0, loop=True), HEALTH,
                   inbox.offer, reader)
        for i in range(20)
    ]  # fmt: skip
    for replay in replays:
        replay.start()
    taker.wait_for(lambda: len(taker.audio) == 20)
    started = time.monotonic()
    for replay in replays:
        replay.request_stop()
    assert all(r.closed.wait(1.0) for r in replays)
    assert time.monotonic() - started < 1.0
    time.sleep(0.2)
    counts = {name: len(blocks) for name, blocks in taker.audio.items()}
    time.sleep(0.5)
    assert {name: len(blocks) for name, blocks in taker.audio.items()} == counts


def test_when_the_pipeline_cannot_take_every_stream_no_stream_is_always_left_out(
    tmp_path: Path, rig: Rig
) -> None:
    """30 looping files into an inbox that holds 10 blocks: the same streams used to get all the room."""
    reader, inbox, taker = rig(10, 2, 0.02)
    _write(tmp_path / "a.wav", 2.0, seed=9)
    for i in range(30):
        FileReplay(f"s{i}", _source(tmp_path / "a.wav", realtime=False, loop=True), HEALTH, inbox.offer,
                   reader).start()  # fmt: skip
    taker.wait_for(lambda: len(taker.audio) == 30, timeout=10.0)
    time.sleep(1.0)
    counts = [len(taker.audio[f"s{i}"]) for i in range(30)]
    assert min(counts) >= max(counts) / 3, counts  # shared out, if not exactly evenly
