"""Export the zoo's Keras model: a small CNN trained on scikit-learn's digits, converted
with tf2onnx as its users do. The result, ``tests/zoo/data/keras_digits.onnx`` (13 KiB),
is committed; this script is how it was made.

TensorFlow and tf2onnx install beside kiln's pins (protobuf 7, numpy 2: checked), but
TensorFlow adds about 1.5 GB to an environment for this one model, so it runs in a
throwaway virtual environment instead of kiln's dev extra:

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu==2.21.0 \\
        tf2onnx==1.17.0 scikit-learn "protobuf>=7.35.1,<8" "numpy>=2.2,<3" "onnx>=1.23,<1.24"
    /tmp/tf/bin/python tests/zoo/keras_digits.py tests/zoo/data/keras_digits.onnx
"""

import sys

import numpy as np


def main(output: str) -> None:
    import tensorflow as tf
    import tf2onnx
    from sklearn.datasets import load_digits

    tf.keras.utils.set_random_seed(0)
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32).reshape(-1, 8, 8, 1)  # NHWC, as Keras has it
    inputs = tf.keras.Input((8, 8, 1), name="image")
    h = tf.keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = tf.keras.layers.BatchNormalization()(h)
    h = tf.keras.layers.ReLU()(h)
    h = tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    outputs = tf.keras.layers.Dense(10, activation="softmax", name="digit")(h)
    model = tf.keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:1500], y[:1500], epochs=60, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x[1500:], y[1500:], verbose=0)
    print(f"held-out accuracy {accuracy:.3f}")
    spec = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=output)


if __name__ == "__main__":
    main(sys.argv[1])
