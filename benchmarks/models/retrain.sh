#!/usr/bin/env bash
# Retrains the checkpoints that benchmarks and studies rely on (CPU, 2 cores: see README.md here).
set -euo pipefail
cd "$(dirname "$0")/../.."
Q=.venv/bin/qrobust
$Q train --model small-cnn --data mnist --epochs 3 --out benchmarks/models/small-cnn-mnist
$Q train --model resnet20 --data cifar10 --epochs 18 --out benchmarks/models/resnet20-cifar10
