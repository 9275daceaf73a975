"""The imaging task of ``ceremony demo --task imaging``: DICOM folders and a CNN session.

Each hospital gets a folder of synthetic DICOM scans (:mod:`peer.data.synthetic_imaging`:
lesion vs no lesion, non-IID prevalence and scanners) and a ``[data]`` table naming it in its
configuration; the session trains the ``cnn`` preset on them. The peers decode their own
files as the session declares; the demo never reads a pixel itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peer.kit import LocalKit

__all__ = ["IMAGING_IMAGES", "IMAGING_SIZE", "imaging_payload", "prepare_imaging"]

# The imaging task (peer/data/synthetic_imaging.py): DICOM files per hospital, small enough
# for two cores. With 250 images (about 200 for training) each hospital spends about
# epsilon 9.2 of its 10 on the imaging session below (PLD, delta 1e-5).
IMAGING_IMAGES = 250
IMAGING_SIZE = 32


def imaging_payload(rounds: int) -> dict[str, Any]:
    """The demo's imaging session: the cnn preset (two Conv2D layers, a Dense head) on each
    hospital's DICOM folder, decoded as declared here."""
    return {
        "kind": "training",
        "model": "cnn",
        "filters": [8, 16],
        "hidden": [16],
        "image": {"size": [IMAGING_SIZE, IMAGING_SIZE], "channels": 1},
        "training_rounds": rounds,
        "local_steps": 15,
        "batch_size": 32,
        # 0.5, not 1.0: at batch 32 a step of 1.0 swung every score together (in-process
        # replay, 3 seeds: final accuracy 0.67-0.92 at 1.0, 0.80-0.96 at 0.5; BENCHMARKS.md,
        # issue 12 lane i).
        "lr": 0.5,
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "max_records": 10000,
        "loss_bound": 5.0,
        "eval_noise": 2.0,
    }


def prepare_imaging(
    workdir: Path,
    kit: LocalKit,
    *,
    seed: int,
    stage_seconds: float,
    policy: dict[str, object],
    say: Callable[[str], None],
) -> None:
    """Each hospital's DICOM folder and a [data] table naming it in its configuration."""
    import csv

    from peer.data.synthetic_imaging import write_imaging_task
    from peer.kit import write_peer_config

    folders = write_imaging_task(
        workdir / "imaging", list(kit.kits), IMAGING_IMAGES, size=IMAGING_SIZE, seed=seed
    )
    for peer_id, folder in folders.items():
        with (folder / "labels.csv").open(encoding="utf-8") as handle:
            labels = [int(row["label"]) for row in csv.DictReader(handle)]
        say(
            f"  {peer_id}: {len(labels)} DICOM images ({sum(labels) / len(labels):.0%} with a "
            f"lesion) in {folder}",
        )
        site = kit.kits[peer_id]
        data = (
            f'[data]\nsource = "images"\nfolder = "{folder}"\n'
            f'labels = "{folder / "labels.csv"}"\nimage_size = [{IMAGING_SIZE}, {IMAGING_SIZE}]\n'
        )
        write_peer_config(
            site.config,
            peer_id,
            site.address,
            stage_seconds=stage_seconds,
            policy=policy,
            extra=data,
        )
