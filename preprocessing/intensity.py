"""Scanner intensities -> [0, 1] (what the network trains on) and back (what `udean infer`
writes). docs/data-format.md, "Intensities".

- `minmax` (the paper protocol, II-C: "each dataset was scaled to the range of 0 to 1"): lo, hi =
  the volume's minimum and maximum.
- `percentile` (the default for own data): lo = the p_lo percentile of all voxels (the
  background floor), hi = the p_hi percentile of the head (voxels above the volume's mean, a
  crude head mask that does not depend on the field of view); values outside [lo, hi] clip. One
  bright vessel or a fat-saturation failure no longer sets the scale of a whole scan, and lo is
  not taken inside the head, so dark CSF is not clipped to background.

`Scaling` records (method, lo, hi) of one scan in its own units: the manifest keeps it per
subject, inference fits it on each input and `invert`s the SR with it. Training clips to [0, 1];
inference does not lose what lies beyond: the network sees the clipped scan, the part beyond
[0, 1] (`excess`, e.g. contrast-enhanced vessels above the 99.5th percentile) is carried over to
the SR grid and added back, and the result is kept within the input's own range (udean/infer.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

METHODS = ("minmax", "percentile")


@dataclass(frozen=True)
class Scaling:
    method: str
    lo: float
    hi: float

    def to_dict(self) -> dict:
        return asdict(self)


def fit(data: np.ndarray, method: str, percentiles: tuple[float, float] = (0.5, 99.5)) -> Scaling:
    """The scaling of `data` (any units); ValueError (no path: the caller names the file) when
    it maps everything to one value."""
    if method == "minmax":
        lo, hi = float(data.min()), float(data.max())
    elif method == "percentile":
        head = data[data > data.mean()]
        lo = float(np.percentile(data, percentiles[0]))
        hi = float(np.percentile(head, percentiles[1])) if head.size else lo
    else:
        raise ValueError(f"intensity method {method!r}: allowed {', '.join(METHODS)}")
    if hi <= lo:
        raise ValueError(f"constant image (all voxels {lo:g}" + (")" if method == "minmax" else
                         f" between the {percentiles[0]} and {percentiles[1]} percentiles)") + ", nothing to learn from")
    return Scaling(method, lo, hi)


def describe(method: str, percentiles: tuple[float, float] = (0.5, 99.5)) -> str:
    """What the scaling does, in words (the preprocessing plan)."""
    if method == "minmax":
        return "min-max of each scan -> [0, 1]"
    return (f"each scan's {percentiles[0]:g}th percentile (all voxels) -> 0, {percentiles[1]:g}th (head) -> 1, "
            "clipped for training; udean infer inverts it per input, beyond-range values kept")


def apply(data: np.ndarray, s: Scaling, clip: bool = True) -> np.ndarray:
    """float32 `data` -> [0, 1] (`clip`; else the same map, unclipped), in place (the same
    float32 operations for every method, so the paper protocol's volumes are bit for bit what
    they always were)."""
    data -= s.lo
    data *= np.float32(1.0 / (s.hi - s.lo))
    if clip:
        np.clip(data, 0.0, 1.0, out=data)
    return data


def excess(x: np.ndarray) -> np.ndarray:
    """What clipping a scaled scan to [0, 1] removes: x - clip(x, 0, 1), float32 (0 inside)."""
    return (x - np.clip(x, 0.0, 1.0)).astype(np.float32)


def invert(x: np.ndarray, s: Scaling, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Scaled values -> the scan's own units: x * (hi - lo) + lo, float32; clipped to
    `value_range` (the input's own minimum and maximum) when given."""
    y = np.asarray(x, dtype=np.float64) * (s.hi - s.lo) + s.lo
    if value_range is not None:
        np.clip(y, value_range[0], value_range[1], out=y)
    return y.astype(np.float32)
