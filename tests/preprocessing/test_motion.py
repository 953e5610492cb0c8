"""Simulated patient motion (II-C): bounds, determinism, geometry."""
import numpy as np
from scipy import ndimage

from preprocessing import motion
from preprocessing.config import MotionConfig
from preprocessing.subject import STREAM_MOTION, subject_rng


def test_draws_stay_in_paper_bounds_and_cover_them():
    cfg = MotionConfig()
    draws = [motion.draw(cfg, subject_rng(0, f"{i:06d}", STREAM_MOTION)) for i in range(2000)]
    for key, bound in [("rot_z_deg", 2), ("rot_x_deg", 2), ("trans_rl_vox", 2), ("trans_hf_vox", 2),
                       ("shrink_ap_vox", 2), ("shrink_rl_vox", 2)]:
        v = np.array([d[key] for d in draws])
        assert np.all(np.abs(v) <= bound), key
        assert np.abs(v).max() > 0.95 * bound and np.abs(v).min() < 0.05 * bound, key
    assert min(d["shrink_ap_vox"] for d in draws) >= 0


def test_seeded_per_subject():
    cfg = MotionConfig()
    a = motion.draw(cfg, subject_rng(0, "100307", STREAM_MOTION))
    assert a == motion.draw(cfg, subject_rng(0, "100307", STREAM_MOTION))
    assert a != motion.draw(cfg, subject_rng(0, "100408", STREAM_MOTION))
    assert a != motion.draw(cfg, subject_rng(1, "100307", STREAM_MOTION))


ZERO = dict(rot_z_deg=0.0, rot_x_deg=0.0, trans_rl_vox=0.0, trans_hf_vox=0.0, shrink_ap_vox=0.0, shrink_rl_vox=0.0)


def blob(shape=(40, 40, 40)):
    g = np.indices(shape).astype(np.float32)
    c = [(n - 1) / 2 for n in shape]
    r2 = sum((g[i] - c[i]) ** 2 / (0.3 * shape[i]) ** 2 for i in range(3))
    return np.clip(1.2 - r2, 0, 1).astype(np.float32)


def test_identity_and_translation():
    vol = blob()
    np.testing.assert_allclose(motion.apply(vol, ZERO), vol, atol=1e-6)
    moved = motion.apply(vol, {**ZERO, "trans_rl_vox": 2.0, "trans_hf_vox": -1.0})
    np.testing.assert_allclose(moved[12:30, :, 8:30], vol[10:28, :, 9:31], atol=1e-5)


def test_shrink_and_rotation_axes():
    vol = blob()
    com0 = np.array(ndimage.center_of_mass(vol))
    shr = motion.apply(vol, {**ZERO, "shrink_rl_vox": 2.0})
    # RL (axis 0) extent shrinks, AP and HF do not; centre stays
    def spread(v, ax):  # second moment along one axis
        p = v.sum(axis=tuple(a for a in range(3) if a != ax))
        x = np.arange(len(p)) - (len(p) - 1) / 2
        return np.sqrt((p * x ** 2).sum() / p.sum())

    assert np.isclose(spread(shr, 0) / spread(vol, 0), 38 / 40, rtol=5e-3)
    assert np.isclose(spread(shr, 1), spread(vol, 1), rtol=1e-3) and np.isclose(spread(shr, 2), spread(vol, 2), rtol=1e-3)
    np.testing.assert_allclose(ndimage.center_of_mass(shr), com0, atol=1e-3)
    # rotation about Z leaves every HF (axis 2) profile sum unchanged
    rz = motion.apply(vol, {**ZERO, "rot_z_deg": 2.0})
    np.testing.assert_allclose(rz.sum(axis=(0, 1)), vol.sum(axis=(0, 1)), rtol=2e-2, atol=1e-2)
    assert not np.allclose(rz, vol, atol=1e-3)
