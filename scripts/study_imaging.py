"""Imaging: federated DP-SGD of the ``cnn`` preset on DICOM files vs centralized, at eps = 3.

Usage::

    python -m scripts.study_imaging [--output bench-results/imaging.json] [--seeds 5]
                                    [--quick]

The task (:mod:`peer.data.synthetic_imaging`, generated here): lesion vs no lesion on
textured 12-bit grayscale images, written as real DICOM files with ``pydicom``. Three
hospitals, non-IID as in ``tests/network/test_imaging_network.py``: lesion shares of 25, 50
and 75 % and each its own "scanner" (brightness, contrast, texture scale). A **global test
set** is written the same way with the three scanners in equal parts (lesion share about
50 %), from another seed: the population every model is judged on.

Every image is read back through the project's image source
(:class:`peer.data.ImageFolderSource`: labels CSV, pydicom decoding, 12-bit ``max_value``
normalization, ``tf.data``), the DICOM path a hospital's ``[data]`` table would use; every
hospital's folder is used for training (``test_fraction = 0``). The decoded images are then
held in memory (a few MB) and trained with :class:`peer.training.LayerwiseDPSGD`'s compiled
loop, the per-layer DP-SGD a session uses for a declared model (a session streams the sampled
files step by step instead, :func:`peer.payloads.training_inputs.train_declared`; the steps
are the same, streaming would only make this study slower).

**Model**: the project's ``cnn`` preset, built from a training payload
(:class:`peer.payloads.training.TrainingSpec`'s ``declared_json``, so whatever the preset is
today) with the demo's widths (``filters``, ``hidden``), from one fixed seed.

**Configurations** (epsilon from the PLD accountant at delta 1e-5, training steps only):

- centralized non-private: all hospitals' images in one place, the same steps with the
  per-example clipping kept and *no noise* (plain SGD at this learning rate diverges for
  this CNN: 50 % accuracy, AUC 0.64 over 3 seeds when measured; clipping is kept as the
  stabilizer it is, the noise is what privacy costs);
- centralized DP-SGD: the same, sigma calibrated to epsilon;
- each hospital alone (DP): its images only, sigma for its own sampling rate;
- federated (DP): ``rounds`` rounds of ``local_steps`` DP-SGD steps per hospital, aggregated
  as :mod:`peer.payloads.training` does (:func:`scripts.study_common.federated_rounds`),
  FedAvg; one sigma for the session, the largest any hospital needs. A real session also
  releases noisy evaluation sums each round (``eval_noise``), which cost a little more
  epsilon; they are left out here, as in the flchain study.

**Metrics**: accuracy at the fixed 0.5 threshold (never tuned on the test set) and AUC,
averaged over ``--seeds`` seeds (sampling and noise), with 95 % percentile-bootstrap
intervals over the test set (:func:`scripts.study_common.summarize`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from scripts.study_common import DELTA, cell, federated_rounds, sigma_for, summarize

if TYPE_CHECKING:
    from peer.payloads.training import TrainingSpec

DEFAULT_OUTPUT = "bench-results/imaging.json"
SEED = 20261201
EPSILON = 3.0
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
Images = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Settings:
    """The task's sizes and the training hyperparameters (public; the same for every model)."""

    size: int = 32  # images are size x size pixels, written and trained at that size
    images_per_hospital: int = 400
    test_images: int = 600  # the global test set, a third per scanner
    filters: tuple[int, ...] = (8, 16)  # the cnn preset's widths, as in the imaging demo
    hidden: tuple[int, ...] = (16,)
    epochs: float = 10.0  # centralized and alone: expected passes over the local data
    batch: int = 64  # expected batch of centralized training
    hospital_batch: int = 32  # expected batch at a hospital (alone and federated)
    lr: float = 1.0
    clip: float = 1.0
    rounds: int = 15
    local_steps: int = 20
    seeds: int = 5
    bootstrap: int = 1000


def read_folder(folder: Path, size: int) -> tuple[Images, Labels, dict[str, Any]]:
    """One folder of DICOM files through the project's image source: (images, labels, info)."""
    from peer.data import ImageFolderSource, ImageSourceConfig

    source = ImageFolderSource(
        ImageSourceConfig(folder, folder / "labels.csv", (size, size), test_fraction=0.0)
    )
    info = source.describe()
    x, y = source.load("train")
    counts = info.label_counts["train"]
    return x, y, {"images": len(y), "lesions": counts.get(1, 0), "notes": list(info.notes)}


def make_task(
    root: Path, settings: Settings
) -> tuple[list[tuple[Images, Labels]], tuple[Images, Labels], dict[str, Any]]:
    """Write the hospitals' DICOM folders and the global test set, then read them back.

    Returns:
        (each hospital's training images and labels, the global test set, metadata).
    """
    from peer.data.synthetic_imaging import write_imaging_task

    s = settings
    folders = write_imaging_task(
        root / "hospitals", HOSPITALS, s.images_per_hospital, size=s.size, seed=SEED
    )
    per_scanner = s.test_images // len(HOSPITALS)
    # The same three scanners and lesion shares, another seed: the hospitals' population.
    test_folders = write_imaging_task(
        root / "test", [f"test-{h}" for h in HOSPITALS], per_scanner, size=s.size, seed=SEED + 1
    )
    hospitals, meta = [], []
    for hospital, folder in folders.items():
        x, y, info = read_folder(folder, s.size)
        hospitals.append((x, y))
        meta.append({"hospital": hospital, **info, "lesion_share": float(y.mean())})
    parts = [read_folder(folder, s.size) for folder in test_folders.values()]
    x_test = np.concatenate([x for x, _, _ in parts])
    y_test = np.concatenate([y for _, y, _ in parts])
    data = {
        "format": "DICOM MONOCHROME2, 12 bits stored (pydicom), read by ImageFolderSource",
        "image_size": [s.size, s.size],
        "hospitals": meta,
        "test_images": len(y_test),
        "test_lesion_share": float(y_test.mean()),
        "majority_accuracy": float(max(y_test.mean(), 1 - y_test.mean())),
    }
    return hospitals, (x_test, y_test), data


def cnn_spec(settings: Settings, sigma: float = 1.0, max_records: int = 100_000) -> TrainingSpec:
    """The imaging session's training payload (the ``cnn`` preset), as a session declares it."""
    from peer.payloads.training import TrainingSpec

    s = settings
    return TrainingSpec.from_payload(
        {
            "kind": "training",
            "model": "cnn",
            "filters": list(s.filters),
            "hidden": list(s.hidden),
            "image": {"size": [s.size, s.size], "channels": 1},
            "training_rounds": s.rounds,
            "local_steps": s.local_steps,
            "batch_size": s.hospital_batch,
            "lr": s.lr,
            "clip_norm": s.clip,
            "noise_multiplier": sigma,
            "delta": DELTA,
            "max_records": max_records,
        }
    )


class Trainer:
    """One CNN, its per-layer DP-SGD trainer and one noise generator, reused (one trace)."""

    def __init__(self, settings: Settings) -> None:
        import tensorflow as tf

        from peer.training import (
            LayerwiseDPSGD,
            ModelPolicy,
            build_declared_model,
            get_flat_weights,
        )

        self.settings = settings
        spec = cnn_spec(settings)
        self.n_parameters = spec.n_parameters()
        self.model = build_declared_model(spec.declared_json, SEED, ModelPolicy())
        self.dpsgd = LayerwiseDPSGD(self.model)
        self.initial = get_flat_weights(self.model)
        self.generator = tf.random.Generator.from_seed(SEED)

    def train(
        self,
        start: npt.ArrayLike,
        x: Images,
        y: Labels,
        *,
        steps: int,
        q: float,
        sigma: float | None,
        seed: int | None = None,
    ) -> npt.NDArray[np.float32]:
        """``steps`` DP-SGD steps from ``start`` (``sigma = 0``: clipped, no noise; None:
        plain SGD, unclipped)."""
        from peer.training import get_flat_weights, set_flat_weights

        if seed is not None:
            self.generator.reset_from_seed(seed)
        set_flat_weights(self.model, np.asarray(start, dtype=np.float32))
        self.dpsgd.run(
            x,
            y.astype(np.float32),
            steps=steps,
            sampling_rate=q,
            lr=self.settings.lr,
            clip_norm=None if sigma is None else self.settings.clip,
            noise_multiplier=0.0 if sigma is None else sigma,
            generator=self.generator,
        )
        return get_flat_weights(self.model)

    def scores(self, weights: npt.ArrayLike, x: Images) -> npt.NDArray[np.float64]:
        """The predicted lesion probability of every image."""
        from peer.training import predict_proba, set_flat_weights

        set_flat_weights(self.model, np.asarray(weights, dtype=np.float32))
        return predict_proba(self.model, x)


def federated(
    trainer: Trainer, hospitals: list[tuple[Images, Labels]], eps: float, seed: int
) -> tuple[npt.NDArray[np.float32], float, list[float]]:
    """Federated DP-SGD (FedAvg); (weights, sigma, each hospital's epsilon)."""
    from peer.training import epsilon

    s = trainer.settings
    total_steps = s.rounds * s.local_steps
    rates = [min(1.0, s.hospital_batch / len(y)) for _, y in hospitals]
    # The smallest hospital's rate needs the largest sigma; it keeps every one within eps.
    sigma = sigma_for(max(rates), total_steps, eps)
    spec = cnn_spec(s, sigma, max_records=max(len(y) for _, y in hospitals))

    def local(weights: npt.NDArray[np.float32], h: int) -> npt.NDArray[np.float32]:
        x, y = hospitals[h]
        return trainer.train(weights, x, y, steps=s.local_steps, q=rates[h], sigma=sigma)

    trainer.generator.reset_from_seed(seed)
    weights = federated_rounds(spec, trainer.initial, local, len(hospitals))
    return weights, sigma, [epsilon(q, sigma, total_steps, DELTA) for q in rates]


def run(settings: Settings, workdir: Path, eps: float = EPSILON) -> dict[str, Any]:
    from peer.training import epsilon

    start = time.perf_counter()
    hospitals, (x_test, y_test), data = make_task(workdir, settings)
    data["seconds_to_write_and_read"] = time.perf_counter() - start
    rng = np.random.default_rng(SEED)
    boot = rng.integers(0, len(y_test), size=(settings.bootstrap, len(y_test)))
    trainer = Trainer(settings)
    seeds = [SEED + 1000 * i for i in range(settings.seeds)]
    s = settings
    x_all = np.concatenate([x for x, _ in hospitals])
    y_all = np.concatenate([y for _, y in hospitals])
    q_all = min(1.0, s.batch / len(y_all))
    steps_all = math.ceil(s.epochs / q_all)

    def judged(models: Sequence[npt.ArrayLike]) -> dict[str, Any]:
        return summarize(np.stack([trainer.scores(w, x_test) for w in models]), y_test, boot)

    def each_seed(x: Images, y: Labels, steps: int, q: float, sigma: float | None) -> Any:
        return [
            trainer.train(trainer.initial, x, y, steps=steps, q=q, sigma=sigma, seed=sd)
            for sd in seeds
        ]

    result: dict[str, Any] = {
        "data": data,
        "model": {
            "preset": "cnn",
            "filters": list(s.filters),
            "hidden": list(s.hidden),
            "parameters": trainer.n_parameters,
        },
        "settings": asdict(s),
        "epsilon": eps,
        "delta": DELTA,
    }
    start = time.perf_counter()
    result["centralized_nonprivate"] = {
        "noise": "none (per-example clipping kept)",
        "steps": steps_all,
        **judged(each_seed(x_all, y_all, steps_all, q_all, 0.0)),
    }
    sigma = sigma_for(q_all, steps_all, eps)
    result["centralized_dp"] = {
        "sigma": sigma,
        "steps": steps_all,
        "epsilon_spent": epsilon(q_all, sigma, steps_all, DELTA),
        **judged(each_seed(x_all, y_all, steps_all, q_all, sigma)),
    }
    # The hospitals are the same size: one sampling rate, step count and sigma.
    q = min(1.0, s.hospital_batch / min(len(hy) for _, hy in hospitals))
    steps = math.ceil(s.epochs / q)
    h_sigma = sigma_for(q, steps, eps)
    result["alone_dp"] = [
        {"sigma": h_sigma, "steps": steps, **judged(each_seed(hx, hy, steps, q, h_sigma))}
        for hx, hy in hospitals
    ]
    runs = [federated(trainer, hospitals, eps, sd) for sd in seeds]
    result["federated_fedavg"] = {
        "sigma": runs[0][1],
        "steps_per_hospital": s.rounds * s.local_steps,
        "epsilon_per_hospital": runs[0][2],
        **judged([r[0] for r in runs]),
    }
    result["comparison"] = compare(result["federated_fedavg"], result["centralized_dp"])
    result["seconds_training"] = time.perf_counter() - start
    return result


def compare(fed: dict[str, Any], central: dict[str, Any]) -> dict[str, Any]:
    """How far federated is from centralized DP, and whether their intervals overlap."""

    def overlap(metric: str) -> bool:
        (a, b), (c, d) = fed[f"{metric}_ci95"], central[f"{metric}_ci95"]
        return bool(a <= d and c <= b)

    return {
        "accuracy_points_below_centralized_dp": 100 * (central["accuracy"] - fed["accuracy"]),
        "auc_below_centralized_dp": central["auc"] - fed["auc"],
        "accuracy_intervals_overlap": overlap("accuracy"),
        "auc_intervals_overlap": overlap("auc"),
    }


def table(result: dict[str, Any]) -> str:
    data, model = result["data"], result["model"]
    sizes = ", ".join(
        f"{h['hospital']} {h['images']} ({100 * h['lesion_share']:.0f}% lesions)"
        for h in data["hospitals"]
    )
    lines = [
        f"DICOM task: {data['image_size'][0]}x{data['image_size'][1]} pixels; {sizes}; "
        f"global test set {data['test_images']} ({100 * data['test_lesion_share']:.0f}% lesions)",
        f"model: cnn preset, filters {model['filters']}, hidden {model['hidden']}, "
        f"{model['parameters']:,} parameters; eps = {result['epsilon']:g}, delta = "
        f"{result['delta']:g}; {result['settings']['seeds']} seeds",
        "configuration | accuracy % (0.5 threshold) [95% CI] | AUC [95% CI]",
    ]
    rows = [
        ("centralized non-private", result["centralized_nonprivate"]),
        ("centralized DP-SGD", result["centralized_dp"]),
        ("federated DP (FedAvg)", result["federated_fedavg"]),
    ]
    rows += [
        (f"{h['hospital']} alone (DP)", entry)
        for h, entry in zip(data["hospitals"], result["alone_dp"], strict=True)
    ]
    for name, entry in rows:
        lines.append(f"{name} | {cell(entry)} | {cell(entry, 'auc')}")
    lines.append(f"(majority class: {100 * data['majority_accuracy']:.1f} %)")
    lines.append(f"federated vs centralized DP: {result['comparison']}")
    return "\n".join(lines)


QUICK = Settings(
    images_per_hospital=60,
    test_images=60,
    epochs=1.0,
    rounds=2,
    local_steps=3,
    seeds=2,
    bootstrap=50,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    parser.add_argument("--workdir", help="where the DICOM files go (default: a temporary one)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings(seeds=args.seeds)
    with tempfile.TemporaryDirectory(prefix="study-imaging-") as scratch:
        result = run(settings, Path(args.workdir or scratch))
    result["command"] = "python -m scripts.study_imaging " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    print(table(result))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
