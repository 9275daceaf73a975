"""Record sources that need no file: the bundled data set and a synthetic generator.

The bundled data set is the Wisconsin Diagnostic Breast Cancer data (569 patients, 30
features) shipped inside scikit-learn, so no network is needed. Note that scikit-learn's
``target`` is 0 for *malignant* and 1 for *benign*; we store **label 1 = malignant**, so that
the positive class is the disease and sensitivity/specificity have their clinical meaning.
"""

from __future__ import annotations

import numpy as np

from .importer import stratified_split
from .records import PatientRecord

__all__ = [
    "BUNDLED_DATASET_NAME",
    "breast_cancer_feature_names",
    "breast_cancer_records",
    "diabetes_feature_names",
    "diabetes_records",
    "synthetic_records",
]

BUNDLED_DATASET_NAME = "sklearn-breast-cancer-wisconsin"


def breast_cancer_records(
    rng: np.random.Generator, test_fraction: float = 0.2
) -> list[PatientRecord]:
    """The bundled data set as records with a label-stratified train/test split.

    Patient ids are ``wdbc-0000`` ... ``wdbc-0568`` (the row index in scikit-learn's copy);
    diagnosis is ``"malignant"`` (label 1) or ``"benign"`` (label 0).
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    features = np.asarray(bunch.data, dtype=np.float64)
    labels = 1 - np.asarray(bunch.target, dtype=np.int64)  # sklearn: 0 = malignant
    splits = stratified_split(labels, test_fraction, rng)
    return [
        PatientRecord(
            patient_id=f"wdbc-{i:04d}",
            diagnosis="malignant" if labels[i] == 1 else "benign",
            features=features[i],
            label=int(labels[i]),
            split=splits[i],
        )
        for i in range(len(labels))
    ]


def breast_cancer_feature_names() -> list[str]:
    """The 30 feature names of the bundled data set, in vector order."""
    from sklearn.datasets import load_breast_cancer

    return [str(name) for name in load_breast_cancer().feature_names]


def diabetes_records(
    rng: np.random.Generator, classes: int = 3, test_fraction: float = 0.2
) -> list[PatientRecord]:
    """scikit-learn's diabetes data set (442 patients, 10 baseline measurements: age, sex,
    BMI, blood pressure, six serum measurements, each centred and scaled as scikit-learn ships
    them, within about +-0.2) as records for the multi-class and regression tasks.

    ``target`` is the disease progression one year after baseline (25-346); ``label`` is its
    quantile class out of ``classes`` (0 = slowest progression), so one set of records serves
    a regression session (the target) and a multi-class one (the label). Patient ids are
    ``diab-0000`` ... ``diab-0441``; the split is stratified by class.
    """
    from sklearn.datasets import load_diabetes

    if classes < 2:
        raise ValueError(f"classes must be at least 2, not {classes}")
    bunch = load_diabetes()
    features = np.asarray(bunch.data, dtype=np.float64)
    progression = np.asarray(bunch.target, dtype=np.float64)
    cuts = np.quantile(progression, np.arange(1, classes) / classes)
    labels = np.searchsorted(cuts, progression, side="right").astype(np.int64)
    splits = stratified_split(labels, test_fraction, rng)
    return [
        PatientRecord(
            patient_id=f"diab-{i:04d}",
            diagnosis=f"progression class {labels[i]}",
            features=features[i],
            label=int(labels[i]),
            split=splits[i],
            target=float(progression[i]),
        )
        for i in range(len(labels))
    ]


def diabetes_feature_names() -> list[str]:
    """The 10 feature names of the diabetes data set (age, sex, bmi, bp, s1-s6)."""
    from sklearn.datasets import load_diabetes

    return [str(name) for name in load_diabetes().feature_names]


def synthetic_records(
    n: int,
    n_features: int,
    rng: np.random.Generator,
    *,
    test_fraction: float = 0.2,
    id_prefix: str = "syn",
) -> list[PatientRecord]:
    """``n`` synthetic patients from a fixed logistic model, for scale tests.

    Features are standard normal; the label is 1 when a random linear score plus logistic
    noise is positive, so a linear model reaches roughly 80-90% accuracy. Everything is drawn
    in a few vectorized calls, so 100,000 records take well under a second.
    """
    if n < 0 or n_features < 1:
        raise ValueError("n must be >= 0 and n_features >= 1")
    features = rng.standard_normal((n, n_features))
    weights = rng.standard_normal(n_features) / np.sqrt(n_features)
    score = 3.0 * features @ weights + rng.logistic(size=n)
    labels = (score > 0).astype(np.int64)
    is_test = rng.random(n) < test_fraction
    diagnoses = np.where(labels == 1, "positive", "negative")
    return [
        PatientRecord(
            f"{id_prefix}-{i:07d}",
            str(diagnoses[i]),
            features[i],
            int(labels[i]),
            "test" if is_test[i] else "train",
        )
        for i in range(n)
    ]
