"""Benchmark: the digits CNN's validation accuracy and training time on this machine.

Not a test: it prints figures to record in bench/README.md. The floor it checks is the issue's
acceptance bar: at least 99 % validation accuracy (stratified 20 % hold-out) within 15 s of
training on 2 cores. "Training" is the sum of the epochs (forward, backward, step, and the
per-epoch validation); the wall time adds data loading, checkpoints and the plot.

    .venv/bin/python bench/train_digits.py [--seed N] [--repeats K]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time

import torch

from training.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs with seeds seed..seed+K-1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    accs, train_secs, walls = [], [], []
    for seed in range(args.seed, args.seed + args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = train(TrainConfig(seed=seed), tmp, progress=False)
            walls.append(time.perf_counter() - started)
        accs.append(result.history[-1]["val_acc"])
        train_secs.append(sum(e["seconds"] for e in result.history))
        print(f"seed {seed}: val acc {100 * accs[-1]:.2f} %, {train_secs[-1]:.2f} s training")
    ok = min(accs) >= 0.99 and max(train_secs) <= 15
    print(
        f"digits_cnn: val acc {100 * statistics.mean(accs):.2f} % (min {100 * min(accs):.2f} %) "
        f"in {statistics.mean(train_secs):.2f} s of training ({len(result.history)} epochs, "
        f"{statistics.mean(walls):.2f} s wall) -> {'PASS' if ok else 'FAIL'} (>= 99 % in <= 15 s)"
    )


if __name__ == "__main__":
    main()
