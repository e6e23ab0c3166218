"""Detection quality on real audio: MIMII fan id_00, the agreed split, several seeds, one table.

    python -m training.mimii --data ../shared/data/mimii-fan-id00 [--seeds 0 1 2] [--out runs/mimii]

Trains on normal/00000000-00000009, tests on normal/00000010-00000019 and all anomaly/ clips (the split in
the data's NOTICE), once per seed, and prints AUC and pAUC as mean +- std: anomalyd's model with its
defaults, and the DCASE 2020 Task 2 baseline re-implemented (training/dcase2020.py) on the same split and
seeds, next to the baseline's published figure (which comes from another, larger test: docs/mimii.md).
Then anomalyd's bundles meet the capture chains of a plant (training/robustness.py): the normal test clips
scaled by -6 to +6 dB and sent through 44.1 and 48 kHz round trips.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from anomalyd.bundle import load_bundle
from training import dcase2020, evaluate, robustness, train

BASELINE_AUC = 0.5396  # DCASE 2020 Task 2 baseline, fan id_00 (from the data's NOTICE)


def _link_split(data: Path, work: Path) -> tuple[Path, Path]:
    """Folders of symbolic links holding the agreed train and test-normal files."""
    train_dir, test_dir = work / "train-normal", work / "test-normal"
    for folder, indices in ((train_dir, range(10)), (test_dir, range(10, 20))):
        folder.mkdir(parents=True, exist_ok=True)
        for i in indices:
            link = folder / f"{i:08d}.wav"
            if not link.exists():
                link.symlink_to((data / "normal" / f"{i:08d}.wav").resolve())
    return train_dir, test_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.mimii", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with normal/ and anomaly/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/mimii"))
    parser.add_argument("--preset", type=Path, help="training preset (default: the built-in defaults)")
    args = parser.parse_args(argv)

    train_dir, test_dir = _link_split(args.data, args.out)
    results = []
    chains: list[list[robustness.Row]] = []
    for seed in args.seeds:
        bundle_dir = args.out / f"seed{seed}"
        options = ["--normal", str(train_dir), "--out", str(bundle_dir), "--seed", str(seed), "--quiet"]
        if args.preset:
            options += ["--preset", str(args.preset)]
        if train.main([*options, "--name", "mimii-fan-id00"]) != 0:
            return 2
        _, metrics = evaluate.evaluate(load_bundle(bundle_dir), test_dir, args.data / "anomaly")
        seconds = load_bundle(bundle_dir).meta.training["seconds"]
        results.append({"system": "anomalyd", "seed": seed, "train_seconds": seconds, **asdict(metrics)})
        print(f"seed {seed}: anomalyd AUC {metrics.auc:.4f} pAUC {metrics.pauc:.4f} TPR {metrics.tpr:.2f} "
              f"FPR {metrics.fpr:.2f} (trained in {seconds:.0f} s)", flush=True)  # fmt: skip
        chains.append(robustness.robustness(load_bundle(bundle_dir), test_dir, args.data / "anomaly"))
        results[-1]["robustness"] = [asdict(row) for row in chains[-1]]
        baseline = _baseline(train_dir, test_dir, args.data / "anomaly", seed)
        results.append(baseline)
        print(f"seed {seed}: DCASE 2020 baseline AUC {baseline['auc']:.4f} pAUC {baseline['pauc']:.4f} "
              f"(trained in {baseline['train_seconds']:.0f} s)", flush=True)  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print()
    print("| system (fan id_00, 10 train / 10+20 test clips) | AUC % | pAUC % |")
    print("|---|---|---|")
    print(f"| DCASE 2020 baseline, published (another test set) | {BASELINE_AUC * 100:.2f} | n/a for id_00 |")
    for system, label in (
        ("dcase2020", "DCASE 2020 baseline, re-implemented"),
        ("anomalyd", "anomalyd conv AE"),
    ):
        auc = np.array([r["auc"] for r in results if r["system"] == system]) * 100
        pauc = np.array([r["pauc"] for r in results if r["system"] == system]) * 100
        print(f"| {label}, {len(auc)} seeds, mean +- std | {auc.mean():.2f} +- {auc.std():.2f} "
              f"| {pauc.mean():.2f} +- {pauc.std():.2f} |")  # fmt: skip
    print()
    print(robustness.table(chains))
    return 0


def _baseline(train_dir: Path, test_dir: Path, anomaly_dir: Path, seed: int) -> dict[str, float | int | str]:
    """The re-implemented DCASE 2020 baseline on the same split and seed: AUC and pAUC of its clip scores."""
    started = time.monotonic()
    model = dcase2020.train_baseline(sorted(train_dir.glob("*.wav")), seed)
    seconds = time.monotonic() - started
    normal, anomaly = sorted(test_dir.glob("*.wav")), sorted(anomaly_dir.glob("*.wav"))
    scores = [model.clip_score(path) for path in [*normal, *anomaly]]
    labels = [0] * len(normal) + [1] * len(anomaly)
    return {
        "system": "dcase2020", "seed": seed, "train_seconds": seconds,
        "auc": float(roc_auc_score(labels, scores)),
        "pauc": float(roc_auc_score(labels, scores, max_fpr=evaluate.MAX_FPR)),
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
