"""One place that turns a stream's configured source into the object that captures it: the daemon and
`anomalyd record` (without a daemon) open sources with the same classes and settings."""

from __future__ import annotations

from anomalyd.config import FileSource, HealthConfig, MicSource, StreamConfig
from anomalyd.sources.base import Offer, Sink
from anomalyd.sources.file import FileReader, FileReplay
from anomalyd.sources.mic import DeviceCapture, Member, MicIO, PortAudioHost


def make_source(
    members: tuple[StreamConfig, ...],
    health: HealthConfig,
    *,
    capture_sink: Sink,
    replay_offer: Offer,
    files: FileReader,
    host: PortAudioHost,
    io: MicIO,
) -> FileReplay | DeviceCapture:
    """The source of `members` (streams that share one device, or one replayed file's stream).

    Capture callbacks get `capture_sink`, which must never block; a replayed file is read by `files`, and
    handed to `replay_offer`, which refuses what finds no room (so that replay as fast as possible loses
    nothing).
    """
    first = members[0].source
    if isinstance(first, FileSource):
        return FileReplay(members[0].name, first, health, replay_offer, files)
    assert isinstance(first, MicSource)
    return DeviceCapture(
        spec=first.device,
        sample_rate=first.sample_rate,
        block_seconds=first.block_seconds,
        members=[Member(s.name, s.source.channel) for s in members],
        health=health,
        sink=capture_sink,
        host=host,
        io=io,
    )
