"""TensorFlow's own answers for the Keras fixtures: input gradients and Grad-CAM.

Runs in the TensorFlow environment (not the project's), from the repository root::

    /tmp/tfenv/bin/python -m tests.keras_reference REQUEST.npz ANSWER.npz

It rebuilds each fixture's Keras model exactly as ``tests/fixtures/make_keras_fixtures.py``
and ``make_keras_classifier.py`` made it (same seeds, same weights) and answers, for the
request's ``NAME/x`` (N×H×W×C inputs) and ``NAME/targets``:

* ``NAME/grad``: ∂ y[i, target_i] / ∂ x, per row (``tf.GradientTape``);
* ``NAME/ig``: Integrated Gradients from a zero baseline by the Riemann sum at ``alphas``:
  x ⊙ mean_k ∂ y[i, target_i] / ∂ x (α_k x);
* ``NAME/cam`` and ``NAME/layer`` when ``NAME/cam_values`` (N×C×h×w, the tensor the package
  reads) is given: the Keras layer whose output equals it and Grad-CAM there before the
  ReLU, Σ_k mean_hw(∂ y / ∂ A_k) A_k;
* ``NAME/stored``: the gradient of each top output at the fixture's stored input, which
  must equal the committed ``NAME_grad.npy`` (the rebuilt model is the converted one).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import numpy as np
import tensorflow as tf

from tests.fixtures import make_keras_classifier, make_keras_fixtures

MATCH = 1e-4


def keras_model(name: str) -> tuple[tf.keras.Model, int]:
    """The fixture's Keras model and its fixed batch size (0 = free)."""
    if name in make_keras_fixtures.MODELS:
        index = list(make_keras_fixtures.MODELS).index(name)
        tf.keras.utils.set_random_seed(index)
        rng = np.random.default_rng(index)
        model = make_keras_fixtures.MODELS[name]()
        make_keras_fixtures.randomize_statistics(model, rng)
        return model, 0
    batch = {"keras_nhwc_softmax": None, "keras_batch2": 2}[name]
    return make_keras_classifier.build(batch), batch or 0


def in_chunks(function, x: np.ndarray, batch: int, *rest: np.ndarray) -> np.ndarray:
    """``function`` on rows of ``x`` in chunks of a fixed batch (the last padded)."""
    if not batch:
        return function(x, *rest)
    parts = []
    for start in range(0, len(x), batch):
        rows = slice(start, start + batch)
        count = len(x[rows])
        padded = [np.concatenate([a[rows], np.repeat(a[rows][-1:], batch - count, axis=0)])
                  for a in (x, *rest)]
        parts.append(function(*padded)[:count])
    return np.concatenate(parts)


def gradient(model: tf.keras.Model, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    tensor = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        scores = model(tensor, training=False)
        picked = tf.reduce_sum(tf.gather(scores, targets.astype(np.int64), batch_dims=1))
    return tape.gradient(picked, tensor).numpy()


def matching_layer(model: tf.keras.Model, x: np.ndarray,
                   wanted: np.ndarray) -> tf.keras.layers.Layer:
    """The layer whose N×H×W×C output is ``wanted`` (N×C×H×W)."""
    layers = [layer for layer in model.layers[1:] if len(layer.output.shape) == 4]
    probe = tf.keras.Model(model.inputs, [layer.output for layer in layers])
    for layer, value in zip(layers, probe(tf.constant(x), training=False), strict=True):
        value = np.transpose(value.numpy(), (0, 3, 1, 2))
        if value.shape == wanted.shape and np.abs(value - wanted).max() <= MATCH * max(
                np.abs(wanted).max(), 1e-12):
            return layer
    raise LookupError("no Keras layer outputs the package's CAM tensor")


def grad_cam(model: tf.keras.Model, layer: tf.keras.layers.Layer, x: np.ndarray,
             targets: np.ndarray) -> np.ndarray:
    both = tf.keras.Model(model.inputs, [layer.output, model.output])
    with tf.GradientTape() as tape:
        activations, scores = both(tf.constant(x), training=False)
        picked = tf.reduce_sum(tf.gather(scores, targets.astype(np.int64), batch_dims=1))
    gradients = tape.gradient(picked, activations).numpy()
    weights = gradients.mean(axis=(1, 2))  # N × K
    return np.einsum("nk,nhwk->nhw", weights, activations.numpy())


def answer_model(name: str, x: np.ndarray, targets: np.ndarray, alphas: np.ndarray,
                 cam_values: np.ndarray | None) -> dict[str, np.ndarray]:
    model, batch = keras_model(name)
    grad = partial(gradient, model)
    out = {f"{name}/grad": in_chunks(grad, x, batch, targets)}
    steps = [in_chunks(grad, alpha * x, batch, targets) for alpha in alphas]
    out[f"{name}/ig"] = x * np.mean(steps, axis=0)
    if cam_values is not None:
        layer = matching_layer(model, x[:batch or None], cam_values[:batch or None])
        out[f"{name}/layer"] = np.array(layer.name)
        out[f"{name}/cam"] = in_chunks(partial(grad_cam, model, layer), x, batch, targets)
    stored = make_keras_fixtures.FOLDER / f"{name}_input.npy"
    if stored.exists():
        inputs = np.load(stored)
        top = model(tf.constant(inputs), training=False).numpy().argmax(axis=1)
        out[f"{name}/stored"] = gradient(model, inputs, top)
    return out


def answer(request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in (str(n) for n in request["names"]):
        out.update(answer_model(name, request[f"{name}/x"], request[f"{name}/targets"],
                                request["alphas"], request.get(f"{name}/cam_values")))
    return out


def main() -> None:
    request, answer_path = Path(sys.argv[1]), Path(sys.argv[2])
    with np.load(request) as data:
        np.savez(answer_path, **answer(dict(data)))


if __name__ == "__main__":
    main()
