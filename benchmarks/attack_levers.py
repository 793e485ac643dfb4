"""What one attack step costs under the levers the attack loop could pull (issue 17 item 1):
eager float32 (what PGD runs), channels_last input, channels_last input and weights, and
torch.compile (inductor), on small-cnn (MNIST) and resnet20 (CIFAR-10).

One step is a forward and an input-gradient backward of the cross-entropy at batch 256, the
parameters frozen (as the loop runs them). Medians over repeats, variants interleaved per
round; the compile time is reported separately. The loop itself adds nothing measurable
(attack_speed.json: measured equal-work ratios equal the ratio the pass costs predict), so
these per-step ratios are what each lever would give an attack.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_levers.py \\
        --out benchmarks/results/attack_levers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = (("small-cnn-mnist", "mnist"), ("resnet20-cifar10", "cifar10"))


def step_fn(model, x, y, memory_format=torch.contiguous_format):
    def step():
        xg = x.contiguous(memory_format=memory_format).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xg), y)
        (g,) = torch.autograd.grad(loss, xg)
        return g.contiguous()  # the loop's tensors stay in the default layout
    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/attack_levers.json"))
    args = ap.parse_args(argv)

    from qrobust.checkpoint import load_checkpoint
    from qrobust.data import load_dataset, take
    from qrobust.hardware import keep_large_allocations

    keep_large_allocations()  # as the command line does
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for ckpt, dataset in CASES:
        model, _ = load_checkpoint(ROOT / "benchmarks/models" / ckpt)
        model.eval().requires_grad_(False)
        x, y = take(load_dataset(dataset).test, args.batch).tensors()
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        start = time.perf_counter()
        compiled = torch.compile(model)
        step_fn(compiled, x, y)()
        compile_s = time.perf_counter() - start
        variants = {"eager": step_fn(model, x, y),
                    "channels_last_input": step_fn(model, x, y, torch.channels_last),
                    "channels_last_input_and_weights": step_fn(cl_model, x, y,
                                                               torch.channels_last),
                    "torch_compile": step_fn(compiled, x, y)}
        reference = variants["eager"]()
        times: dict[str, list[float]] = {k: [] for k in variants}
        agree = {k: float((v().sign() == reference.sign()).float().mean())
                 for k, v in variants.items()}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": ckpt, "batch": args.batch, "compile_s": compile_s,
               "median_step_s": med, "speedup_vs_eager": {k: med["eager"] / v
                                                          for k, v in med.items()},
               "gradient_sign_agreement_with_eager": agree}
        rows.append(row)
        print(ckpt, {k: round(v, 3) for k, v in row["speedup_vs_eager"].items()},
              f"compile {compile_s:.1f} s", flush=True)
    result = {"benchmark": "attack_levers", "command": "OMP_NUM_THREADS="
              f"{torch.get_num_threads()} .venv/bin/python benchmarks/attack_levers.py "
              f"--repeats {args.repeats} --batch {args.batch}", "rows": rows,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version()}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
