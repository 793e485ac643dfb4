#!/usr/bin/env bash
# Retrains the checkpoints that benchmarks and studies rely on (CPU, 2 cores: see README.md here).
set -euo pipefail
cd "$(dirname "$0")/../.."
Q=.venv/bin/qrobust
$Q train --model small-cnn --data mnist --epochs 3 --out benchmarks/models/small-cnn-mnist
$Q train --model resnet20 --data cifar10 --epochs 18 --out benchmarks/models/resnet20-cifar10
# sigma=0.25 base classifier for randomized smoothing: fine-tuned from the clean resnet20 with
# Gaussian augmentation (clean acc 60.8%, 70.7% under N(0, 0.25^2) noise on the 1,017 test images)
$Q train --model resnet20 --data cifar10 --epochs 3 --lr 0.05 --noise-sigma 0.25 \
  --init benchmarks/models/resnet20-cifar10 --out benchmarks/models/resnet20-cifar10-noise025
# QA-IBP certified MNIST models (MLP 784-64-10 and small-cnn width 8, w8a8 per tensor, ReLU6
# range; MLPs at eps 0.03 and 0.15, the CNN at 0.15): verified by benchmarks/certified_mnist.py verify
.venv/bin/python benchmarks/certified_mnist.py train
# MobileNetV2-style CIFAR-10 models for benchmarks/import_e2e.py, trained briefly (2 epochs on the
# first 10,000 images): the torch one (exported to ONNX and quantized by ORT at run time) and the
# Keras one, converted to int8 TFLite by TensorFlow (needs a separate TensorFlow venv: see the script)
OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mobilenet_cifar.py --epochs 2 --train-images 10000
/tmp/tfvenv/bin/python benchmarks/mobilenet_tflite.py --epochs 2 --train-images 10000
# LSQ (learned step sizes) resnet20 fine-tunes from the float checkpoint (issue 16): Adam, cosine,
# crops and flips; first and last layer 8-bit (7-bit codes: reduce-range, as resolved on the
# AVX2 CPU they were trained on); twin and integer accuracy on the 1,017 test images in meta.json
OMP_NUM_THREADS=1 $Q quantize --ckpt benchmarks/models/resnet20-cifar10 --recipe w4a4,lsq,first=8,last=8 \
  --reduce-range on --qat-epochs 2 --qat-lr 1e-4 --out benchmarks/models/resnet20-cifar10-w4a4-lsq
OMP_NUM_THREADS=1 $Q quantize --ckpt benchmarks/models/resnet20-cifar10 --recipe w2a2,lsq,first=8,last=8 \
  --reduce-range on --qat-epochs 8 --qat-lr 3e-4 --out benchmarks/models/resnet20-cifar10-w2a2-lsq
