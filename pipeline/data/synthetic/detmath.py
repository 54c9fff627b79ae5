"""Elementary functions that give the same bits on every x86 (and other IEEE 754) machine.

NumPy computes cos, sin, arctan2, exp, log and non-integer powers with SIMD code chosen at
run time for the CPU (AVX-512 on one machine, AVX2 on another), and those kernels differ
in the last bit. The synthetic generators threshold such values (a kidney's outline, a
pyramid's edge) and round them to 8-bit pixels, so a last-bit difference moved pixels and
changed the dataset's fingerprint between an AVX-512 and an AVX2 machine, hence the Optuna
study and the model too. These versions use only operations IEEE 754 rounds exactly
(+, -, *, /, sqrt, floor, ldexp, frexp), whatever the vector width, in float64: range
reduction (Cody-Waite) and a polynomial, accurate to a few units in the last place of
float64, far below what the float32 images resolve.
"""

from __future__ import annotations

import numpy as np

_PIO2_HI = 1.57079632673412561417e00   # pi/2 split so k * _PIO2_HI is exact for |k| < 2**20
_PIO2_LO = 6.07710050650619224932e-11
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_PIO2 = 6.36619772367581382433e-01
_INV_LN2 = 1.44269504088896338700e00
_PI = 3.14159265358979311600e00


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _like(result: np.ndarray, *inputs) -> np.ndarray:
    """float32 inputs give float32 (as NumPy's ufuncs do), anything else float64."""
    dtype = np.result_type(*[np.asarray(i).dtype for i in inputs], np.float32)
    out = result.astype(dtype if dtype == np.float32 else np.float64)
    return out if out.ndim else out[()]


def _horner(x: np.ndarray, coefficients: list[float]) -> np.ndarray:
    acc = np.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        acc = acc * x + c
    return acc


# Taylor coefficients on |r| <= pi/4, highest power first.
_SIN = [1 / 6227020800, -1 / 39916800, 1 / 362880, -1 / 5040, 1 / 120, -1 / 6, 1.0]      # in r^2, times r
_COS = [-1 / 87178291200, 1 / 479001600, -1 / 3628800, 1 / 40320, -1 / 720, 1 / 24, -1 / 2, 1.0]


def _quadrant(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x = k * pi/2 + r with |r| <= pi/4: (sin r, cos r, k mod 4)."""
    x = _f64(x)
    k = np.floor(x * _INV_PIO2 + 0.5)
    r = (x - k * _PIO2_HI) - k * _PIO2_LO
    r2 = r * r
    return _horner(r2, _SIN) * r, _horner(r2, _COS), np.mod(k, 4).astype(np.int64)


def cos(x):
    s, c, q = _quadrant(x)
    return _like(np.choose(q, [c, -s, -c, s]), x)


def sin(x):
    s, c, q = _quadrant(x)
    return _like(np.choose(q, [s, c, -s, -c]), x)


def _atan_unit(t: np.ndarray) -> np.ndarray:
    """atan(t) for 0 <= t <= 1: atan(t) = pi/4 + atan((t - 1) / (t + 1)) above tan(pi/8),
    then the odd series in |u| <= tan(pi/8) (0.414; 23 terms reach 1e-17)."""
    high = t > 0.41421356237309503
    u = np.where(high, (t - 1.0) / (t + 1.0), t)
    u2 = u * u
    series = _horner(u2, [(-1) ** n / (2 * n + 1) for n in range(22, -1, -1)]) * u
    return np.where(high, _PI / 4 + series, series)


def arctan2(y, x):
    """The angle of (x, y) in [-pi, pi], as np.arctan2 (0 at the origin)."""
    yy, xx = _f64(y), _f64(x)
    a, b = np.abs(yy), np.abs(xx)
    big, small = np.maximum(a, b), np.minimum(a, b)
    t = np.divide(small, big, out=np.zeros(np.broadcast(a, b).shape), where=big > 0)
    angle = _atan_unit(t)
    angle = np.where(a > b, _PI / 2 - angle, angle)
    angle = np.where(np.signbit(xx), _PI - angle, angle)
    return _like(np.where(np.signbit(yy), -angle, angle), y, x)


_EXP = [1 / 6227020800, 1 / 479001600, 1 / 39916800, 1 / 3628800, 1 / 362880, 1 / 40320, 1 / 5040, 1 / 720,
        1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0]


def exp(x):
    """e^x for |x| < 700: x = k ln2 + r with |r| <= ln2/2, then 2^k times a degree-13 series."""
    xx = _f64(x)
    k = np.floor(xx * _INV_LN2 + 0.5)
    r = (xx - k * _LN2_HI) - k * _LN2_LO
    return _like(np.ldexp(_horner(r, _EXP), k.astype(np.int64)), x)


def log(x):
    """Natural log for x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), then the atanh series."""
    xx = _f64(x)
    m, e = np.frexp(xx)
    low = m < 0.7071067811865476
    m = np.where(low, m * 2.0, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = 2.0 * s * _horner(s2, [1 / (2 * n + 1) for n in range(13, -1, -1)])
    return _like(e * _LN2_HI + (e * _LN2_LO + series), x)


def power(x, p):
    """x ** p for x >= 0 and real exponents p > 0 (0 ** p = 0); x and p broadcast."""
    xx, pp = _f64(x), _f64(p)
    positive = xx > 0
    out = exp(pp * log(np.where(positive, xx, 1.0)))
    return _like(np.where(positive, _f64(out), 0.0), x, p)


def bspline_taps(g: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline taps at positions `g` in grid-node units: node indices (N, 4), clipped
    to 0..n-1, and float32 weights (N, 4). Products, not `** 3`: NumPy's power() is one of
    the CPU-dependent kernels."""
    i = np.floor(g).astype(np.int64)
    t = (np.asarray(g) - i)[:, None].astype(np.float32)
    t2, s = t * t, 1 - t
    t3 = t2 * t
    w = np.concatenate([s * s * s, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], 1) / 6
    return np.clip(i[:, None] + np.arange(-1, 3), 0, n - 1), w


def bspline_resample(grid: np.ndarray, taps: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    """Interpolate one axis of `grid` at `taps` (from bspline_taps) with 4 gathers and
    products. No matmul: BLAS picks its summation order (and threads) by CPU and load, and
    a gather stays single-threaded, fast next to other busy processes and bit-identical."""
    idx, w = taps
    shape = [1] * grid.ndim
    shape[axis] = -1
    return sum(np.take(grid, idx[:, k], axis=axis) * w[:, k].reshape(shape) for k in range(4))


def rician(signal: np.ndarray, sigma: np.float32, rng: np.random.Generator) -> np.ndarray:
    """The magnitude of `signal` plus complex Gaussian noise of std `sigma` per channel (MRI
    magnitude images: Rician noise). sqrt is correctly rounded, so the bits do not depend on
    the CPU."""
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * sigma
    return np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)
