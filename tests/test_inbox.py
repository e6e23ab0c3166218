"""The worker's inbox: merged backlogs, bounded waiting per stream, nothing a stream's state needs lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import parse_config
from anomalyd.inbox import MAX_MERGED_SECONDS, Inbox, Merged, coalesce
from anomalyd.records import SourceState
from anomalyd.sources.base import AudioBlock, SourceNotice
from anomalyd.stream import Model, StreamRuntime

RATE = 16_000


def block(stream: str, start: int, n: int = 1600, rate: int = RATE) -> AudioBlock:
    return AudioBlock(stream, np.arange(start, start + n, dtype=np.float32), rate, float(start))


def test_each_streams_consecutive_blocks_merge_in_order_and_notices_and_controls_end_a_merge() -> None:
    items: list[object] = [
        block("a", 0), block("b", 0), block("a", 1600), block("b", 1600),
        SourceNotice("a", SourceState.LOST, "gone"), block("a", 3200), block("b", 3200),
        "control", block("a", 4800), block("a", 6400, rate=48_000), block("b", 4800),
    ]  # fmt: skip
    out = coalesce(items)
    kinds = [(o.block.stream, o.blocks, o.block.rate) if isinstance(o, Merged) else o for o in out]
    assert kinds == [
        ("a", 2, RATE), ("b", 3, RATE), items[4], ("a", 1, RATE), "control",
        ("a", 1, RATE), ("a", 1, 48_000), ("b", 1, RATE),
    ]  # fmt: skip
    first_a, first_b = out[0], out[1]
    assert isinstance(first_a, Merged)
    assert isinstance(first_b, Merged)
    np.testing.assert_array_equal(first_a.block.samples, np.arange(0, 3200, dtype=np.float32))
    np.testing.assert_array_equal(first_b.block.samples, np.arange(0, 4800, dtype=np.float32))
    assert first_b.block.received == 0.0  # timed from its earliest audio: latency is never understated


def test_a_merge_holds_at_most_max_merged_seconds_and_a_longer_block_stays_whole() -> None:
    per_merge = int(MAX_MERGED_SECONDS * RATE) // 1600
    out = coalesce([block("a", i * 1600) for i in range(per_merge + 3)] + [block("a", 0, 3 * RATE)])
    assert [m.blocks for m in out if isinstance(m, Merged)] == [per_merge, 3, 1]


def test_capture_drops_audio_beyond_the_bound_but_never_a_notice_or_a_control() -> None:
    inbox: Inbox[str] = Inbox(max_blocks=3, stream_blocks=2)
    assert all(inbox.put_nowait(block("a", i)) for i in range(3))
    assert not inbox.put_nowait(block("b", 0))
    assert inbox.put_nowait(SourceNotice("b", SourceState.LOST, "unplugged"))
    inbox.put_control("swap")
    taken = inbox.take(0.0)
    assert len(taken) == 5
    assert taken[3] == SourceNotice("b", SourceState.LOST, "unplugged")
    assert taken[4] == "swap"
    assert inbox.put_nowait(block("b", 0))  # taking made room


def test_a_replay_is_refused_on_its_own_backlog_only_and_told_when_there_is_room() -> None:
    told: list[str] = []
    inbox: Inbox[str] = Inbox(max_blocks=5, stream_blocks=2, on_room=lambda: told.append("room"))
    assert inbox.offer(block("a", 0))
    assert inbox.offer(block("a", 1600))
    assert not inbox.offer(block("a", 3200))  # stream a is at its bound...
    assert inbox.offer(block("b", 0))  # ...which does not hold stream b back
    assert inbox.offer(SourceNotice("a", SourceState.ENDED, "end"))  # notices are never refused
    assert told == []
    assert len(inbox.take(1.0)) == 4
    assert told == ["room"]  # once, after the take: the reader offers again
    assert inbox.offer(block("a", 3200))
    assert len(inbox.take(1.0)) == 1
    assert told == ["room"]  # nothing was refused since the last take: no cue

    for i in range(5):  # the whole inbox's bound holds too
        assert inbox.offer(block(f"s{i}", 0))
    assert not inbox.offer(block("t", 0))
    inbox.take(1.0)
    assert told == ["room", "room"]


def test_take_waits_for_the_first_item_and_times_out_empty() -> None:
    inbox: Inbox[str] = Inbox(max_blocks=10, stream_blocks=10)
    started = time.monotonic()
    assert inbox.take(0.2) == []
    assert time.monotonic() - started >= 0.15
    threading.Timer(0.1, lambda: inbox.put_control("go")).start()
    assert inbox.take(5.0) == ["go"]


@pytest.mark.slow
def test_a_merged_block_gives_the_tiles_windows_and_health_of_its_blocks_one_by_one(
    bundle_dir: Path, tmp_path: Path
) -> None:
    model = Model.load(bundle_dir, threads=1)
    text = '[[streams]]\nname = "s"\nbundle = "b"\n[streams.source]\ntype = "file"\npath = "x.wav"\n'
    config = parse_config(text, "t", tmp_path)
    audio = (0.05 * np.random.default_rng(0).standard_normal(6 * RATE)).astype(np.float32)
    audio[int(2.3 * RATE) : int(2.5 * RATE)] = 0.0  # a dropout in the third second
    audio[int(4.1 * RATE) : int(4.2 * RATE)] = np.nan  # not audio, in the fifth

    def run(blocks: list[np.ndarray]) -> tuple[list[tuple[SourceState, str]], list[int], np.ndarray]:
        runtime = StreamRuntime(config.streams[0], model, "n", config.health, config.storage.clips)
        statuses, windows, tiles = [], [], []
        for samples in blocks:
            out = runtime.feed(AudioBlock("s", samples, RATE, 0.0))
            statuses += [(s.state, s.detail) for s in out.statuses]
            windows += [w.index for w in out.windows]
            tiles += [t.values for t in out.tiles]
        return statuses, windows, np.stack(tiles)

    one_by_one = run([audio[i : i + 1600] for i in range(0, len(audio), 1600)])
    merged = next(m for m in coalesce([AudioBlock("s", audio, RATE, 0.0)]) if isinstance(m, Merged))
    at_once = run([merged.block.samples])
    assert at_once[0] == one_by_one[0]
    assert [state for state, _ in at_once[0]] == [
        SourceState.OK, SourceState.SILENT, SourceState.OK, SourceState.INVALID, SourceState.OK,
    ]  # fmt: skip
    assert at_once[1] == one_by_one[1]
    assert len(at_once[1]) > 0
    np.testing.assert_allclose(at_once[2], one_by_one[2], rtol=1e-5, atol=1e-4)
