"""Rigid mutual-information registration: Table I, benchmark 2 ("rigid-registered LR and HR"),
and the optional alignment of own paired val/test scans (data.own.registration).

Paper: "The rigid image-registration were perform on Amira 3D with metrics of extended mutual
information." We use SimpleITK (ITK's registration framework) instead of Amira: Mattes mutual
information, a 3D Euler (rotation + translation) transform, regular-step gradient descent,
two resolution levels. Fixed image: the target LR volume (voxel j at HR voxel 2j, spacing 2 HR
voxels); moving image: the motion-corrupted HR volume (spacing 1). The moving HR is then
resampled (linear) onto its own HR grid through the found transform, so it lines up with the LR.

Rigid registration undoes the rotation and translation of `preprocessing.motion`, not its
shrink (a 0.7-0.9 % scaling: the "non-rigid deformation" the paper says registration cannot
remove); the residual is what benchmark 2 is about.
"""
from __future__ import annotations

import math

import numpy as np


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ValueError("rigid registration needs SimpleITK: pip install 'udean-hpc[baselines]' "
                         "(or SimpleITK>=2.3)") from None
    return sitk


def _image(a: np.ndarray, spacing: tuple[float, float, float]):
    sitk = _sitk()

    img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
    img.SetSpacing([float(s) for s in spacing[::-1]])  # SimpleITK's axes are numpy's reversed
    img.SetOrigin((0.0, 0.0, 0.0))
    return img


def register_rigid(fixed_lr: np.ndarray, moving_hr: np.ndarray, scale: tuple[int, int, int] = (2, 2, 2),
                   iterations: int = 200, sampling: float = 0.25, seed: int = 0,
                   threads: int | None = 1) -> tuple[np.ndarray, dict]:
    """Register `moving_hr` (X, Y, Z) to `fixed_lr` (X/2, Y/2, Z/2); both canonical, in [0, 1].

    Returns (moving_hr resampled through the rigid transform onto the HR grid, float32 in
    [0, 1]; report {rotation_deg (3,), translation_vox (3,) in HR voxels, metric, iterations,
    stop}). Deterministic for a seed (random metric sampling is seeded)."""
    sitk = _sitk()

    if threads is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    if any(f * s != m for f, s, m in zip(fixed_lr.shape, scale, moving_hr.shape)):
        raise ValueError(f"registration: LR {fixed_lr.shape} x {scale} != HR {moving_hr.shape}")
    fixed = _image(fixed_lr, tuple(float(s) for s in scale))
    moving = _image(moving_hr, (1.0, 1.0, 1.0))

    init = sitk.Euler3DTransform()
    # rotate about the middle of the head: motion.apply rotates about the volume centre
    init.SetCenter(moving.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in moving.GetSize()]))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    tx = reg.Execute(fixed, moving)

    out = sitk.Resample(moving, moving, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    registered = np.clip(sitk.GetArrayFromImage(out), 0.0, 1.0).astype(np.float32)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(tx).GetNthTransform(0)) if tx.GetName() == "CompositeTransform" \
        else sitk.Euler3DTransform(tx)
    params = euler.GetParameters()  # (ax, ay, az) radians, then translation, SimpleITK axis order
    report = {"rotation_deg": [math.degrees(a) for a in params[:3]][::-1],
              "translation_vox": list(params[3:])[::-1],
              "metric": float(reg.GetMetricValue()), "iterations": int(reg.GetOptimizerIteration()),
              "stop": reg.GetOptimizerStopConditionDescription()}
    return registered, report
