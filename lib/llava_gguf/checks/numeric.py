"""The one error measure every numeric check reports.

NMSE, as llama.cpp's model-conversion check (`check-nmse.py`) defines it: the mean squared
difference over the reference's variance. 0 is identical; 1 is as far off as a constant at the
reference's mean. Being relative to the spread of the reference, it compares a logits vector
(spread ~ several units) and an embedding (spread ~ 1e-2) on the same scale, so the bounds in
the README are comparable across checks.
"""
from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def nmse(test, reference) -> float:
    """mean((test - reference)^2) / var(reference); arrays or torch tensors of the same shape."""
    test, reference = _f64(test), _f64(reference)
    if test.shape != reference.shape:
        raise ValueError(f"nmse: shapes differ, {test.shape} vs reference {reference.shape}")
    mse = float(np.mean((test - reference) ** 2))
    var = float(np.var(reference))
    return mse / var if var else (0.0 if mse == 0 else float("inf"))


def cosine(a, b) -> float:
    a, b = _f64(a).ravel(), _f64(b).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else float("nan")
