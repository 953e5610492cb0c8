"""The scaling projections (ring all-reduce + overlap; preprocessing queue) against hand-computed answers."""
import math

import pytest

from benchmarks.projection import (CLUSTERS, exposed_comm_s, fit_link, project, ring_allreduce_s,
                                   step_s)


def test_ring_allreduce_known_answers():
    assert ring_allreduce_s(1e9, 1, 1e9, 1e-3) == 0.0
    # p = 2: each rank sends half the buffer twice (1 x bytes / bw) in 2 steps
    assert ring_allreduce_s(1e9, 2, 1e9, 1e-3) == pytest.approx(1.0 + 2e-3)
    # p = 4: 2*3/4 = 1.5 buffers, 6 latencies
    assert ring_allreduce_s(8e8, 4, 4e8, 1e-5) == pytest.approx(1.5 * 2.0 + 6e-5)


def test_ring_bandwidth_term_saturates_latency_term_grows():
    big = [ring_allreduce_s(1e9, p, 1e10, 0.0) for p in (2, 8, 64, 1024)]
    assert all(a < b for a, b in zip(big, big[1:]))
    assert big[-1] < 2 * 1e9 / 1e10  # never more than 2 buffers through the slowest link
    lat = [ring_allreduce_s(0.0, p, 1e10, 1e-5) for p in (2, 8, 64)]
    assert lat == pytest.approx([2e-5, 14e-5, 126e-5])


def test_bad_arguments():
    with pytest.raises(ValueError):
        ring_allreduce_s(1.0, 0, 1.0, 0.0)
    with pytest.raises(ValueError):
        exposed_comm_s(1.0, 1.0, 1.5)
    with pytest.raises(ValueError):
        project([1, 2], 1.0, 1.0, 8, (1e9, 0.0), mode="sideways")


def test_overlap_hides_at_most_the_backward_pass():
    assert exposed_comm_s(0.3, 1.0, 0.0) == pytest.approx(0.3)
    assert exposed_comm_s(0.3, 1.0, 1.0) == pytest.approx(0.0)
    assert exposed_comm_s(0.3, 1.0, 0.5) == pytest.approx(0.15)
    assert exposed_comm_s(3.0, 1.0, 1.0) == pytest.approx(2.0)  # backward is only 1 s long
    # compute 0.9 s, backward 2/3 of it = 0.6 s; comm 1 s fully overlappable -> 0.4 s exposed
    assert step_s(0.9, 1.0, overlap=1.0) == pytest.approx(1.3)


def test_weak_and_strong_efficiency():
    # compute 1 s, 1 GB of gradients over 1 GB/s, no latency: comm(2) = 1 s
    weak = project([1, 2], 1.0, 1e9, 8, (1e9, 0.0), mode="weak")
    assert [x.efficiency for x in weak] == pytest.approx([1.0, 0.5])
    assert weak[1].throughput == pytest.approx(16 / 2.0)
    strong = project([1, 2], 1.0, 1e9, 8, (1e9, 0.0), mode="strong")
    assert strong[1].step_s == pytest.approx(0.5 + 1.0)
    assert strong[1].efficiency == pytest.approx(1.0 / (2 * 1.5))


def test_cluster_link_switches_to_network_beyond_one_node():
    c = CLUSTERS["h100-nvlink-ib200"]
    assert c.link(8) == (c.intra_bw, c.intra_latency)
    assert c.link(9)[0] == min(c.intra_bw, c.inter_bw) < c.intra_bw
    pts = project([1, 8, 16, 64], 0.237, 113e6, 8, c)
    effs = [x.efficiency for x in pts]
    assert effs[0] == 1.0 and all(a >= b for a, b in zip(effs, effs[1:]))
    assert effs[1] - effs[2] > 0.01  # leaving NVLink for the network costs visibly


def test_fit_link_recovers_the_model():
    bw, lat, p = 2e9, 20e-6, 2
    sizes = [1e3, 1e5, 1e6, 1e7]
    times = [ring_allreduce_s(s, p, bw, lat) for s in sizes]
    fbw, flat = fit_link(sizes, times, p)
    assert fbw == pytest.approx(bw, rel=1e-6)
    assert flat == pytest.approx(lat, rel=1e-6)
    assert math.isfinite(fbw)


def test_two_buffers_pay_latency_twice():
    one = project([2], 1.0, 2e6, 8, (1e9, 1e-3))[0].comm_s
    two = project([2], 1.0, [1e6, 1e6], 8, (1e9, 1e-3))[0].comm_s
    assert two - one == pytest.approx(2e-3)


def test_static_and_dynamic_makespan():
    from benchmarks.scaling_preprocess import cohort_costs, makespan_dynamic, makespan_static

    costs = [4.0, 1.0, 1.0, 1.0, 1.0]
    assert makespan_static(costs, 1)[0] == makespan_dynamic(costs, 1)[0] == 8.0
    # static: rank 0 gets 4+1+1, rank 1 gets 1+1; the queue gives rank 1 all four short ones
    assert makespan_static(costs, 2) == (6.0, [6.0, 2.0])
    assert makespan_dynamic(costs, 2) == (4.0, [4.0, 4.0])
    mixed = cohort_costs({"a": [2.0], "b": [1.0]}, {"a": 2, "b": 4})
    assert mixed == [1.0, 2.0, 1.0, 1.0, 2.0, 1.0]  # groups interleaved evenly, as a random split does
