"""Scaling projection: data-parallel UDEAN step time on p GPUs from measured parts.

    step(p) = data_wait + compute(p) + exposed_comm(p)
    comm(p) = ring all-reduce of the G and D gradients (DeepSpeed all-reduces each engine's
              flat gradient once per step, ZeRO stage 0):
              2 (p-1)/p * bytes / bandwidth  +  2 (p-1) * latency
    exposed_comm = comm - min(overlap * comm, backward)   (overlap in [0, 1]: the part of the
              all-reduce that bucketing can hide behind the backward pass; DeepSpeed ZeRO-0 as
              configured by udean.engines reduces after backward, i.e. overlap 0)

`bandwidth` is the ring's bus bandwidth: the slowest link the ring crosses (NVLink or PCIe inside
a node, the node's network link once the job spans nodes). Pure functions, no torch: the unit test
checks them against hand-computed answers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GBIT = 1e9 / 8  # bytes/s in one Gb/s

# The issue's own H100 measurement of one UDEAN step, 3D variant, eager bf16, batch 8 per GPU.
# Not measured by this benchmark (no GPU here): pass --step-ms with your own GPU benchmark figure.
H100_STEP_S_3D_BF16_B8 = 0.237
BACKWARD_FRACTION = 2.0 / 3.0  # backward ~ 2x forward: the window comm can hide behind


@dataclass(frozen=True)
class Cluster:
    """A GPU cluster as the ring all-reduce sees it. Bandwidths in bytes/s, latencies in s."""

    name: str
    gpus_per_node: int
    intra_bw: float  # bus bandwidth of a ring inside one node
    intra_latency: float
    inter_bw: float  # per-node network bandwidth (one NIC carries the ring between nodes)
    inter_latency: float

    def link(self, p: int) -> tuple[float, float]:
        """(bandwidth, latency) of the slowest hop of a p-GPU ring."""
        if p <= self.gpus_per_node:
            return self.intra_bw, self.intra_latency
        return min(self.intra_bw, self.inter_bw), max(self.intra_latency, self.inter_latency)


# Nominal figures (NCCL bus bandwidths are below the link's line rate; latencies per ring hop).
CLUSTERS = {
    "h100-nvlink-ib200": Cluster("8x H100 NVLink/node, 200 Gb/s InfiniBand", 8, 350e9, 5e-6, 200 * GBIT * 0.9, 10e-6),
    "h100-nvlink-ib100": Cluster("8x H100 NVLink/node, 100 Gb/s InfiniBand", 8, 350e9, 5e-6, 100 * GBIT * 0.9, 10e-6),
    "a6000-pcie-ib100": Cluster("8x A6000 PCIe/node, 100 Gb/s InfiniBand", 8, 12e9, 10e-6, 100 * GBIT * 0.9, 10e-6),
    "eth25": Cluster("4 GPUs/node PCIe, 25 Gb/s Ethernet", 4, 12e9, 10e-6, 25 * GBIT * 0.9, 50e-6),
}


def ring_allreduce_s(nbytes: float, p: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce of `nbytes` over p ranks (0 for p = 1).

    Reduce-scatter + all-gather: each rank sends and receives 2 (p-1)/p of the buffer in
    2 (p-1) steps, each step paying one link latency.
    """
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if p == 1:
        return 0.0
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    return 2.0 * (p - 1) / p * nbytes / bandwidth + 2.0 * (p - 1) * latency


def exposed_comm_s(comm_s: float, backward_s: float, overlap: float) -> float:
    """Communication left on the critical path when `overlap` of it can run during backward."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    return comm_s - min(overlap * comm_s, backward_s)


def step_s(compute_s: float, comm_s: float, overlap: float = 0.0,
           backward_fraction: float = BACKWARD_FRACTION, data_wait_s: float = 0.0) -> float:
    """Predicted step time: compute + data wait + the communication backward does not hide."""
    return data_wait_s + compute_s + exposed_comm_s(comm_s, backward_fraction * compute_s, overlap)


@dataclass(frozen=True)
class Point:
    p: int
    compute_s: float
    comm_s: float
    step_s: float
    throughput: float  # samples/s over all ranks
    efficiency: float  # weak: t(1)/t(p); strong: t(1)/(p t(p))


def project(p_values, compute_1_s: float, grad_bytes, batch: int, link,
            mode: str = "weak", overlap: float = 0.0, backward_fraction: float = BACKWARD_FRACTION,
            data_wait_s: float = 0.0) -> list[Point]:
    """Predicted scaling at each p.

    compute_1_s: one rank's forward+backward+optimizer time at per-rank batch `batch`.
    grad_bytes: bytes of one gradient all-reduce, or a list of them (one per engine: G, D).
    link: a Cluster, or a function p -> (bandwidth, latency), or a (bandwidth, latency) pair.
    mode: "weak" (per-rank batch fixed) or "strong" (global batch `batch` split over p ranks;
          compute assumed proportional to the per-rank batch, an upper bound on GPUs that are
          underused at small batches).
    """
    if mode not in ("weak", "strong"):
        raise ValueError(f"mode={mode!r}: allowed weak, strong")
    if isinstance(link, Cluster):
        link_of = link.link
    elif callable(link):
        link_of = link
    else:
        link_of = lambda p, bw_lat=tuple(link): bw_lat  # noqa: E731
    buffers = list(grad_bytes) if isinstance(grad_bytes, (list, tuple)) else [grad_bytes]
    t1 = step_s(compute_1_s, 0.0, overlap, backward_fraction, data_wait_s)
    out = []
    for p in p_values:
        compute = compute_1_s if mode == "weak" else compute_1_s / p
        comm = sum(ring_allreduce_s(b, p, *link_of(p)) for b in buffers)
        t = step_s(compute, comm, overlap, backward_fraction, data_wait_s)
        samples = batch * p if mode == "weak" else batch
        eff = t1 / t if mode == "weak" else t1 / (p * t)
        out.append(Point(p, compute, comm, t, samples / t, eff))
    return out


def fit_link(sizes_bytes, seconds, p: int) -> tuple[float, float]:
    """(bandwidth, latency) of the ring model fitted to timed all-reduces of several sizes at p
    ranks: t = a * bytes + b, a = 2(p-1)/(p bw), b = 2(p-1) latency. Least squares on the relative
    error, so the small messages (latency) weigh as much as the large ones (bandwidth)."""
    n = len(sizes_bytes)
    if n < 2 or p < 2:
        raise ValueError("need >= 2 sizes and p >= 2 to fit a link")
    w = [1.0 / max(t, 1e-12) ** 2 for t in seconds]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, sizes_bytes)) / sw
    my = sum(wi * y for wi, y in zip(w, seconds)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, sizes_bytes))
    a = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, sizes_bytes, seconds)) / sxx
    b = max(my - a * mx, 0.0)
    return 2.0 * (p - 1) / p / a, b / (2.0 * (p - 1))


def as_dict(points: list[Point]) -> list[dict]:
    return [asdict(x) for x in points]
