"""Simulated patient motion for the misaligned source group (paper, II-C): rigid rotation by
0-2 deg about the Z (HF) and X (RL) axes, translation by 0-2 voxels RL and HF, and a shrink of
0-2 voxels AP and RL (a 0.7-0.9 % size change). Works on canonical RAS+ volumes, where voxel
axes 0, 1, 2 are RL (X), AP (Y), HF (Z); voxels are isotropic, so voxel-space rotation is the
physical one."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from preprocessing.config import MotionConfig


def draw(cfg: MotionConfig, rng: np.random.Generator) -> dict[str, float]:
    """One subject's motion: magnitudes uniform in [0, max]; rotation and translation get a
    random sign (patients move both ways), a shrink is a shrink."""
    def signed(m: float) -> float:
        return float(rng.uniform(0.0, m) * rng.choice((-1.0, 1.0)))

    return {
        "rot_z_deg": signed(cfg.rotation_deg),
        "rot_x_deg": signed(cfg.rotation_deg),
        "trans_rl_vox": signed(cfg.translation_vox),
        "trans_hf_vox": signed(cfg.translation_vox),
        "shrink_ap_vox": float(rng.uniform(0.0, cfg.shrink_vox)),
        "shrink_rl_vox": float(rng.uniform(0.0, cfg.shrink_vox)),
    }


def forward_matrix(params: dict[str, float], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(3x3 M, 3 t) with output position p' = M (p - c) + c + t for input voxel p, c the centre."""
    az, ax = np.deg2rad(params["rot_z_deg"]), np.deg2rad(params["rot_x_deg"])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    # shrinking an axis of n voxels by s voxels scales it by (n - s) / n about the centre
    sx = (shape[0] - params["shrink_rl_vox"]) / shape[0]
    sy = (shape[1] - params["shrink_ap_vox"]) / shape[1]
    m = np.diag([sx, sy, 1.0]) @ rz @ rx
    t = np.array([params["trans_rl_vox"], 0.0, params["trans_hf_vox"]])
    return m, t


def apply(vol: np.ndarray, params: dict[str, float], order: int = 1) -> np.ndarray:
    """(X, Y, Z) canonical volume moved by `params`; outside the field of view is 0."""
    m, t = forward_matrix(params, vol.shape)
    c = (np.asarray(vol.shape, dtype=np.float64) - 1) / 2
    inv = np.linalg.inv(m)
    # scipy maps output coordinates o to input inv (o - c - t) + c
    offset = c - inv @ (c + t)
    out = ndimage.affine_transform(vol, inv, offset=offset, order=order, mode="constant", cval=0.0)
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)
