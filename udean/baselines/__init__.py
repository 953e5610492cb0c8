"""Comparison methods of the paper's Tables I and II, adapted to UDEAN's thin-slab patches.

One file per method, named after its paper; every SR network is the one UDEAN infers with
(`udean.models.udean.SRNet`: LR encoder + TS-RCAN SR decoder), so the tables compare training
schemes, not architectures. Images use the public layout everywhere: LR (B, S, H, W),
HR (B, 2S, 2H, 2W).

    loop.py          the one training loop (Adam, cosine LR, alternating optimizer stages)
    pairs.py         patch sets: misaligned / registered / synthetic-LR pairs, unpaired pools
    supervised.py    SupervisedTSRCAN: Table I benchmarks 1-3 (L1 + SSIM)
    (preprocessing/registration.py: rigid mutual-information registration, SimpleITK, benchmark 2)
    zssr.py          ZSSR: per-volume internal learning (Table II)
    cyclegan.py      CycleGANSR: unpaired LR <-> HR translation, then SR (Table II)
    dasr.py          DASR: degradation network + domain distance map + weighted SR (Table II)

Tricubic interpolation is `udean.evaluate.tricubic`; `benchmarks/quality.py` runs them all.
"""
