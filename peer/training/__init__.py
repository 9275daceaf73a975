"""Local model training for a hospital peer: the model, DP-SGD, privacy accounting, FedAvg.

TensorFlow is imported lazily inside the functions that need it, so importing this package is
cheap for tools that do not train.
"""

from __future__ import annotations

from .accounting import (
    PrivacyBudget,
    PrivacyBudgetError,
    TrainingSpend,
    calibrate_noise,
    epsilon,
)
from .declared import ModelPolicy, ModelRefused, build_declared_model, preset_json
from .dpsgd import DPSGD, secure_generator, trainer_for
from .federated import FedAvgResult, LocalTrainConfig, PeerData, fedavg_round, numpy_sum
from .layerwise import LayerwiseDPSGD
from .local import (
    EVAL_HEADER,
    evaluate_sums,
    local_train,
    metrics_from_sums,
    predict_proba,
    update_bound,
)
from .model import ModelSpec, build_model, dense_layers, get_flat_weights, set_flat_weights

__all__ = [
    "DPSGD",
    "EVAL_HEADER",
    "FedAvgResult",
    "LayerwiseDPSGD",
    "LocalTrainConfig",
    "ModelPolicy",
    "ModelRefused",
    "ModelSpec",
    "PeerData",
    "PrivacyBudget",
    "PrivacyBudgetError",
    "TrainingSpend",
    "build_declared_model",
    "build_model",
    "calibrate_noise",
    "dense_layers",
    "epsilon",
    "evaluate_sums",
    "fedavg_round",
    "get_flat_weights",
    "local_train",
    "metrics_from_sums",
    "numpy_sum",
    "predict_proba",
    "preset_json",
    "secure_generator",
    "set_flat_weights",
    "trainer_for",
    "update_bound",
]
