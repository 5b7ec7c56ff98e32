"""A second small example model for the batch (examples/batch.yaml): an MLP on the same 8x8 digits.

Run it (after or without ``scripts/run-example``; it trains its own fp32 teacher)::

    python -m examples.digits_mlp        # writes digits_out/mlp/student.safetensors and distill_config.json

Trains the fp32 MLP (flatten -> Linear 64x64 -> ReLU -> Linear 64x10) on scikit-learn's digits, then
distills an int8 student with ``distill()`` (calibration, then block-wise distillation), the same calls
as :func:`examples.digits.run_demo`, and writes the student's state_dict and the distill config where
the example batch file reads them. Prints fp32 and int8 accuracy on the held-out split.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

STUDENT = "digits_out/mlp/student.safetensors"
CONFIG = "digits_out/mlp/distill_config.json"


class DigitsMLP(nn.Module):
    """Two Linear layers on the flattened 1x8x8 image."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def build_model(hidden: int = 64) -> nn.Module:
    """The MLP, freshly initialised (call ``torch.manual_seed`` first for a fixed init)."""
    return DigitsMLP(hidden)


def prepare(student: str = STUDENT, config: str = CONFIG, seed: int = 0, teacher_epochs: int = 30,
            epochs: int = 2) -> dict[str, float]:
    """Train the teacher, distill the int8 student, write both files; returns the accuracies (percent)."""
    import amct_core
    from examples.digits import accuracy, load_digits_split, make_loader, save_state_dict, train_teacher

    split = load_digits_split(seed)
    teacher = train_teacher(split, seed=seed, epochs=teacher_epochs, build=build_model)
    loader = make_loader(split.x_train, split.y_train, seed=seed)
    Path(config).parent.mkdir(parents=True, exist_ok=True)
    sample = split.x_train[:64]
    amct_core.create_distill_config(config, teacher, sample)
    qat = amct_core.create_distill_model(config, teacher, sample)
    qat = amct_core.distill(teacher, qat, config, loader, epochs=epochs, lr=1e-3).eval()
    save_state_dict(qat, student)
    return {"fp32": accuracy(teacher, split.x_test, split.y_test), "int8": accuracy(qat, split.x_test, split.y_test)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.digits_mlp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default=STUDENT, help="where the distilled state_dict goes (default: %(default)s)")
    ap.add_argument("--config", default=CONFIG, help="where the distill config goes (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    acc = prepare(a.student, a.config, a.seed)
    print(f"digits MLP: fp32 {acc['fp32']:.1f}%, int8 distilled {acc['int8']:.1f}% on the held-out split; "
          f"wrote {a.student} and {a.config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
