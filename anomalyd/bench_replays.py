"""The benchmarks' daemon configs: `streams` file replays of one noise recording (no clips)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from anomalyd.bundle import load_bundle


def replays(
    folder: Path, bundle: Path, streams: int, seconds: float, *, realtime: bool, loop: bool,
    head: str = "", detector: str = "",
) -> str:  # fmt: skip
    """Config text; writes `folder/noise.wav` (`seconds` long), which every stream replays. `head`: top-level
    keys and sections that go first; `detector`: lines of each stream's [streams.detector]."""
    rate = load_bundle(bundle).meta.features.sample_rate
    audio = (0.05 * np.random.default_rng(1).standard_normal(int(seconds * rate))).astype(np.float32)
    sf.write(folder / "noise.wav", audio, rate, subtype="PCM_16")
    text = head + "[storage]\n[storage.clips]\nenabled = false\n"
    for i in range(streams):
        text += f'[[streams]]\nname = "s{i}"\nbundle = "{bundle.resolve()}"\n'
        text += f"[streams.detector]\n{detector}\n" if detector else ""
        text += '[streams.source]\ntype = "file"\npath = "noise.wav"\n'
        text += f"realtime = {str(realtime).lower()}\nloop = {str(loop).lower()}\n"
    return text
