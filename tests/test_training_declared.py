"""Models declared as data: site policy refusals, presets, bit-identical builds from the seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from peer.training import ModelSpec, build_model, get_flat_weights  # noqa: E402
from peer.training.declared import (  # noqa: E402
    ModelPolicy,
    ModelRefused,
    build_declared_model,
    preset_json,
)

ROOT = Path(__file__).resolve().parents[1]


def _cnn_json() -> str:
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.GroupNormalization(2),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    return str(model.to_json())


def test_declared_cnn_builds_identically_from_the_seed_and_differs_across_seeds() -> None:
    policy = ModelPolicy()
    a = get_flat_weights(build_declared_model(_cnn_json(), 42, policy))
    b = get_flat_weights(build_declared_model(_cnn_json(), 42, policy))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, get_flat_weights(build_declared_model(_cnn_json(), 43, policy)))
    assert a.shape == (policy.check(_cnn_json()),)


def test_seeds_in_the_json_do_not_matter_only_the_session_seed() -> None:
    """A proposer cannot pick the initial weights by writing seeds into the JSON."""
    config = json.loads(_cnn_json())
    for layer in config["config"]["layers"]:
        init = layer["config"].get("kernel_initializer")
        if isinstance(init, dict):
            init["config"]["seed"] = 999
    policy = ModelPolicy()
    np.testing.assert_array_equal(
        get_flat_weights(build_declared_model(config, 7, policy)),
        get_flat_weights(build_declared_model(_cnn_json(), 7, policy)),
    )


def test_declared_model_is_bit_identical_in_a_fresh_process(tmp_path: Path) -> None:
    """Two peers are two processes: the same JSON and seed give the same weight bytes."""
    (tmp_path / "model.json").write_text(_cnn_json(), encoding="utf-8")
    script = (
        "import sys, numpy as np\n"
        "from peer.training import get_flat_weights\n"
        "from peer.training.declared import ModelPolicy, build_declared_model\n"
        "text = open(sys.argv[1], encoding='utf-8').read()\n"
        "w = get_flat_weights(build_declared_model(text, 42, ModelPolicy()))\n"
        "np.save(sys.argv[2], w)\n"
    )
    out = tmp_path / "w.npy"
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model.json"), str(out)],
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=300,
    )
    here = get_flat_weights(build_declared_model(_cnn_json(), 42, ModelPolicy()))
    assert np.load(out).tobytes() == here.tobytes()


def test_presets_are_declared_models_with_the_old_seeding() -> None:
    spec = ModelSpec("mlp", 30, hidden=(16, 8), activation="tanh")
    config = json.loads(spec.to_json())
    assert [x["class_name"] for x in config["config"]["layers"]] == ["InputLayer"] + ["Dense"] * 3
    model = build_model(spec, 3)
    # build_model's documented seeding: Glorot-uniform with seed + layer index, zero biases.
    first = keras.initializers.GlorotUniform(seed=3)((30, 16))
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), np.asarray(first))
    np.testing.assert_array_equal(model.layers[0].bias.numpy(), np.zeros(16, np.float32))
    assert model.count_params() == spec.n_parameters() == ModelPolicy().check(preset_json(spec))


def test_policy_refuses_batch_normalization_with_the_reason() -> None:
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1)]
    )
    # Even a site that lists it is refused: it mixes examples.
    policy = ModelPolicy(frozenset({"InputLayer", "Dense", "BatchNormalization"}))
    with pytest.raises(ModelRefused, match=r"'bn' \(BatchNormalization\).*mixes the examples"):
        build_declared_model(model.to_json(), 0, policy)


def test_policy_refuses_a_layer_type_the_site_does_not_allow() -> None:
    policy = ModelPolicy(frozenset({"InputLayer", "Dense"}))
    with pytest.raises(ModelRefused, match=r"'conv2d\w*' \(Conv2D\).*not in this site's"):
        policy.check(_cnn_json())


def test_policy_refuses_an_oversized_model_before_building_it() -> None:
    huge = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(4, name="d0"), keras.layers.Dense(1)]
    ).to_json()
    config = json.loads(huge)
    # Make it absurd after serialization: 10^6 x 10^6 weights would not fit in memory.
    config["config"]["layers"][0]["config"]["batch_shape"] = [None, 10**6]
    config["config"]["layers"][1]["config"]["units"] = 10**6
    with pytest.raises(ModelRefused, match=r"1,000,00\d,\d{3},\d{3} parameters.*limit of 1,000"):
        build_declared_model(config, 0, ModelPolicy(max_parameters=1000))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["config"]["layers"][1].update(class_name="Lambda"), r"Lambda\).*code"),
        (lambda c: c["config"]["layers"][1].update(module="evil.layers"), "no custom objects"),
        (
            lambda c: c["config"]["layers"][1].update(registered_name="Custom>Dense"),
            "no custom objects",
        ),
        (
            lambda c: c["config"]["layers"][1]["config"].update(
                activation={"module": "evil", "class_name": "f", "config": {}}
            ),
            "no custom objects",
        ),
        (
            lambda c: c["config"]["layers"][1]["config"].update(activation="exponential"),
            "not a named built-in",
        ),
        (lambda c: c.update(class_name="Functional"), "only a Sequential"),
        (lambda c: c["config"]["layers"].pop(0), "first layer must be an InputLayer"),
    ],
)
def test_policy_refuses_code_and_custom_objects(mutate: Any, message: str) -> None:
    config = json.loads(preset_json(ModelSpec("mlp", 5, hidden=(3,))))
    mutate(config)
    with pytest.raises(ModelRefused, match=message):
        build_declared_model(config, 0, ModelPolicy())


def test_malformed_json_is_refused_with_a_reason() -> None:
    with pytest.raises(ModelRefused, match="not JSON"):
        ModelPolicy().check("{not json")
    with pytest.raises(ModelRefused, match="not an object"):
        ModelPolicy().check("[1, 2]")
