"""Small utilities shared by the tests."""

import numpy as np


def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e|: the error relative to the reference's scale (robust near zeros)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    denom = max(np.max(np.abs(e)), 1e-30)
    return float(np.max(np.abs(a - e)) / denom)


def assert_close(actual, expected, tol: float = 1e-4, what: str = "") -> float:
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.0e}"
    return err
