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
    histogram_auc,
    local_train,
    metrics_from_sums,
    model_outputs,
    predict_proba,
    update_bound,
)
from .losses import Loss, binary_logit_loss, softmax_loss, squared_loss
from .model import ModelSpec, build_model, dense_layers, get_flat_weights, set_flat_weights

__all__ = [
    "DPSGD",
    "EVAL_HEADER",
    "FedAvgResult",
    "LayerwiseDPSGD",
    "LocalTrainConfig",
    "Loss",
    "ModelPolicy",
    "ModelRefused",
    "ModelSpec",
    "PeerData",
    "PrivacyBudget",
    "PrivacyBudgetError",
    "TrainingSpend",
    "binary_logit_loss",
    "build_declared_model",
    "build_model",
    "calibrate_noise",
    "dense_layers",
    "epsilon",
    "evaluate_sums",
    "fedavg_round",
    "get_flat_weights",
    "histogram_auc",
    "local_train",
    "metrics_from_sums",
    "model_outputs",
    "numpy_sum",
    "predict_proba",
    "preset_json",
    "secure_generator",
    "set_flat_weights",
    "softmax_loss",
    "squared_loss",
    "trainer_for",
    "update_bound",
]
