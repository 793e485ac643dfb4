"""A MobileNetV2-style CIFAR-10 classifier trained briefly in Keras and converted to an int8
TFLite file by TensorFlow's own converter (full-integer post-training quantization): the
third-party file of the import benchmark (benchmarks/import_e2e.py).

TensorFlow is not a qrobust dependency: run this with a separate environment, e.g.
``python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu numpy``; the
file it writes (about 150 KB) is committed, so nothing else needs TensorFlow.

    /tmp/tfvenv/bin/python benchmarks/mobilenet_tflite.py --epochs 4
    # -> benchmarks/models/mbv2-cifar10/model_int8.tflite (+ tflite_meta.json)

The network mirrors benchmarks/mobilenet_cifar.py (inverted residuals: 1x1 expand, 3x3
depthwise, ReLU6, 1x1 linear projection, residual add; 'same' padding as Keras does it) and
takes float images x = p / 255 in [0, 1], NHWC (the stem's batch norm does the
normalization); the file keeps float input and output (QUANTIZE / DEQUANTIZE at its ends), as
deployed classifiers often do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # the file reads x = p / 255 as it is
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10_train50k_test1k.npz"
OUT = ROOT / "benchmarks" / "models" / "mbv2-cifar10"
L = tf.keras.layers


def inverted_residual(x, c_out: int, stride: int, expand: int):
    c_in = x.shape[-1]
    y = L.Conv2D(c_in * expand, 1, use_bias=False)(x)
    y = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(y))
    y = L.DepthwiseConv2D(3, stride, padding="same", use_bias=False)(y)
    y = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(y))
    y = L.BatchNormalization(momentum=0.9)(L.Conv2D(c_out, 1, use_bias=False)(y))
    return L.Add()([x, y]) if stride == 1 and c_in == c_out else y


def mobilenet_v2_cifar(classes: int = 10) -> tf.keras.Model:
    inp = L.Input((32, 32, 3))
    x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(L.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    for c_out, stride, expand in ((16, 1, 2), (24, 2, 4), (24, 1, 4), (32, 2, 4), (32, 1, 4),
                                  (64, 2, 4), (64, 1, 4)):
        x = inverted_residual(x, c_out, stride, expand)
    x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(L.Conv2D(128, 1, use_bias=False)(x)))
    x = L.Dense(classes)(L.GlobalAveragePooling2D()(x))
    return tf.keras.Model(inp, x)


def normalize(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=50000, help="first N training images")
    args = parser.parse_args(argv)
    tf.keras.utils.set_random_seed(args.seed)
    data = np.load(DATA)
    x_train = normalize(data["x_train"][:args.train_images])
    y_train = data["y_train"][:args.train_images]
    x_test, y_test = normalize(data["x_test"]), data["y_test"]
    model = mobilenet_v2_cifar()
    steps = args.epochs * (len(x_train) // 128)
    schedule = tf.keras.optimizers.schedules.CosineDecay(0.05, steps)
    model.compile(optimizer=tf.keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    augment = tf.keras.Sequential([L.RandomFlip("horizontal"), L.RandomTranslation(0.125, 0.125)])
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=args.seed)
             .batch(128, drop_remainder=True).map(lambda x, y: (augment(x, training=True), y)))
    start = time.perf_counter()
    model.fit(train, epochs=args.epochs, verbose=2)
    acc = float(model.evaluate(x_test, y_test, verbose=0)[1])

    def representative():
        for i in range(0, 512, 32):  # 512 training images, as qrobust's own calibration
            yield [x_train[i:i + 32]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "model_int8.tflite").write_bytes(converter.convert())
    (OUT / "tflite_meta.json").write_text(json.dumps({
        "mean": MEAN, "std": STD, "layout": "NHWC", "keras_test_accuracy_float": acc,
        "n_test": len(y_test), "epochs": args.epochs, "train_images": len(x_train),
        "tensorflow": tf.__version__,
        "train_seconds": round(time.perf_counter() - start, 1),
        "command": "/tmp/tfvenv/bin/python benchmarks/mobilenet_tflite.py " + " ".join(sys.argv[1:])},
        indent=1))
    print(f"Keras float test accuracy {acc:.4f} -> {OUT / 'model_int8.tflite'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
