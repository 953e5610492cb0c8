"""SSIM / PSNR against independent straightforward numpy implementations and known answers."""
import numpy as np
import pytest
import torch

from udean.metrics import psnr, ssim


def _ssim_slice_reference(a: np.ndarray, b: np.ndarray, window: int, L: float = 1.0) -> float:
    """Wang et al. 2004 written out: Gaussian-weighted statistics at every 'valid' window position."""
    r = np.arange(window) - (window - 1) / 2
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(a.shape[0] - window + 1):
        for j in range(a.shape[1] - window + 1):
            pa, pb = a[i:i + window, j:j + window], b[i:i + window, j:j + window]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("window", [3, 7])
def test_ssim_matches_reference_per_slice(window):
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 12, 11))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    got = ssim(torch.tensor(x), torch.tensor(y), window=window, reduction="none")
    assert got.shape == (2, 3) and got.dtype == torch.float32
    ref = np.array([[_ssim_slice_reference(x[b, c], y[b, c], window) for c in range(3)] for b in range(2)])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert ssim(torch.tensor(x), torch.tensor(y), window=window).item() == pytest.approx(ref.mean(), rel=1e-4)


def test_ssim_identity_is_one_and_bounded():
    x = torch.rand(2, 6, 20, 17)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, torch.rand_like(x)).item() < 0.5


def test_ssim_volume_slice_axis():
    """A volume is a stack of 2D slices along `slice_axis`: same as slicing by hand."""
    rng = np.random.default_rng(1)
    vol = rng.random((9, 10, 8))
    ref = np.clip(vol + 0.1 * rng.standard_normal(vol.shape), 0, 1)
    got = ssim(vol, ref, slice_axis=2, reduction="none")
    assert got.shape == (8,)
    for k in (0, 7):
        assert got[k].item() == pytest.approx(_ssim_slice_reference(vol[:, :, k], ref[:, :, k], 7), rel=1e-4)
    by_axis0 = ssim(vol, ref, slice_axis=0, reduction="none")
    assert by_axis0.shape == (9,)
    assert by_axis0[3].item() == pytest.approx(_ssim_slice_reference(vol[3], ref[3], 7), rel=1e-4)


def test_ssim_float32_under_low_precision():
    x = torch.rand(1, 3, 16, 16)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    full = ssim(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = ssim(x.bfloat16(), y.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), abs=1e-2)


def _round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest TF32 value (10 explicit mantissa bits): what a GPU's tensor cores read."""
    i = t.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def test_ssim_keeps_full_fp32_where_convolutions_would_run_on_tf32(monkeypatch):
    # On a GPU, float32 convolutions use TF32 by default. Emulated here (no GPU on CI): every conv2d
    # rounds its inputs to TF32 and accumulates exactly. E[x^2] - mu^2 of a flat region (level 0.6,
    # noise 0.003, variance ~1e-5 << C2 = 9e-4) then moved SSIM by 1e-2, past 1.
    real = torch.nn.functional.conv2d

    def conv2d_tf32(x, w, *args, **kw):
        return real(_round_to_tf32(x).double(), _round_to_tf32(w).double(), *args, **kw).float()

    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d_tf32)
    rng = np.random.default_rng(4)
    x = 0.6 + 0.003 * rng.standard_normal((3, 24, 24))
    y = x + 0.003 * rng.standard_normal(x.shape)
    got = ssim(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), reduction="none")
    ref = [_ssim_slice_reference(x[k], y[k], 7) for k in range(3)]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


def test_ssim_rejects_bad_input():
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 1, 5, 5), torch.rand(1, 1, 5, 5), window=7)
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 1, 9, 9), torch.rand(1, 1, 9, 8))


def test_psnr_known_answer():
    x = torch.zeros(2, 4, 4)
    y = torch.full((2, 4, 4), 0.1)  # MSE 0.01 -> 20 dB at data_range 1
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(x, y, data_range=2.0).item() == pytest.approx(20.0 + 20 * np.log10(2), abs=1e-4)
    y[1] = 0.01  # sample 1: MSE 1e-4 -> 40 dB
    np.testing.assert_allclose(psnr(x, y, per_sample=True).numpy(), [20.0, 40.0], atol=1e-3)
    assert torch.isinf(psnr(x, x))
