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
subject, inference fits it on each input and `invert`s the SR with it.
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


def apply(data: np.ndarray, s: Scaling) -> np.ndarray:
    """float32 `data` -> [0, 1], in place (the same float32 operations for every method, so the
    paper protocol's volumes are bit for bit what they always were)."""
    data -= s.lo
    data *= np.float32(1.0 / (s.hi - s.lo))
    np.clip(data, 0.0, 1.0, out=data)
    return data


def invert(x: np.ndarray, s: Scaling) -> np.ndarray:
    """[0, 1] -> the scan's own units: x * (hi - lo) + lo, float32."""
    return (np.asarray(x, dtype=np.float64) * (s.hi - s.lo) + s.lo).astype(np.float32)
