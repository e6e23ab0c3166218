"""`python -m training.evaluate --report`: one self-contained HTML file with every section."""

from __future__ import annotations

import logging
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from training import evaluate

SECTIONS = {"summary", "roc", "histograms", "k-sweep", "files", "logmel"}


class ReportParser(HTMLParser):
    """Sections, image sources, anything that would load from outside, and each section's table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"] or "")
        if tag == "img":
            self.images.append(a["src"] or "")
        if tag in ("link", "script") or (tag != "img" and (a.get("src") or a.get("href"))):
            self.external.append(tag)
        if tag == "tr":
            self._row = []
        if tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        if tag == "tr" and self._row:
            self.rows.setdefault(self.sections[-1], []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _subset(source: Path, target: Path, pattern: str, count: int) -> Path:
    target.mkdir(parents=True)
    for path in sorted(source.glob(pattern))[:count]:
        shutil.copy(path, target)
    return target


@pytest.mark.slow
def test_report_is_one_self_contained_html_file(
    bundle_dir: Path, synth_train: Path, synth_test: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    normal = _subset(synth_test / "normal", tmp_path / "normal", "*.wav", 8)
    shutil.copy(synth_train / "normal_0000.wav", normal / "also-trained-on.wav")  # a training file
    anomaly = tmp_path / "anomaly"
    anomaly.mkdir()
    for fault in ("bearing", "imbalance", "rubbing"):
        for path in sorted((synth_test / "anomaly").glob(f"{fault}_*.wav"))[:2]:
            shutil.copy(path, anomaly)
    report = tmp_path / "report.html"
    with caplog.at_level(logging.WARNING):
        status = evaluate.main(
            ["--bundle", str(bundle_dir), "--normal", str(normal), "--anomaly", str(anomaly),
             "--report", str(report)]
        )  # fmt: skip
    assert status == 0
    assert "1 test file(s) were also training or validation files" in caplog.text
    assert "also-trained-on.wav" in caplog.text

    parser = ReportParser()
    parser.feed(report.read_text(encoding="utf-8"))
    parser.close()
    assert set(parser.sections) == SECTIONS
    assert parser.external == []
    # ROC, histograms, and log-mel images of 3 normal and 3 anomalous clips; all inline.
    assert len(parser.images) == 8
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in parser.images)
    assert "were also training or validation files" in report.read_text()

    files = parser.rows["files"]
    assert len(files) == 9 + 6
    assert {row[3] for row in files} <= {"ANOMALY", "normal"}

    sweep = [(float(r[0]), int(r[2]), float(r[5].rstrip("%"))) for r in parser.rows["k-sweep"]]
    ks = [k for k, _, _ in sweep]
    assert ks == sorted(ks)
    assert 3.0 in ks
    # A higher k can only lower the threshold's reach: fewer false events, fewer detections.
    events = [e for _, e, _ in sweep]
    detection = [d for _, _, d in sweep]
    assert events == sorted(events, reverse=True)
    assert detection == sorted(detection, reverse=True)
    assert events[0] > events[-1] or detection[0] > detection[-1]


@pytest.mark.parametrize("option", ["--report", "--json", "--csv", "--plots"])
def test_an_output_into_a_missing_folder_is_refused_before_scoring(
    tmp_path: Path, option: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Neither the bundle nor the audio exists: the refusal must come before either is looked at.
    missing = tmp_path / "no-such-folder" / "out"
    with caplog.at_level(logging.ERROR):
        status = evaluate.main(
            ["--bundle", str(tmp_path / "no-bundle"), "--normal", str(tmp_path / "n"),
             "--anomaly", str(tmp_path / "a"), option, str(missing)]
        )  # fmt: skip
    assert status == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"{option} {missing}: folder {missing.parent} does not exist"]
