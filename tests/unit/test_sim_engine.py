"""The simulator's event core against queueing theory: exact recursions and closed forms.

Closed-form checks use fixed seeds and enough jobs that sampling noise is ≈ 1 %, against a 3 % bound (at
ρ = 0.9 one run of a million jobs still wanders by ±4 %, so those average four independent replications);
the exact check (FCFS against the Lindley recursion) catches any error at all on a few thousand jobs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from marllb_cli.sim.engine import ServerModel, simulate

INF = math.inf
FCFS_1 = ServerModel(cpus=1, max_workers=1, backlog=INF)
PS_1 = ServerModel(cpus=1, max_workers=INF, backlog=INF)


def poisson_jobs(rate: float, n: int, seed: int, work=None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / rate, n))
    return arrival, (work(rng, n) if work else rng.exponential(1.0, n))


def mean_response(rate: float, server: ServerModel, *, replications: int = 4, n: int = 500_000) -> float:
    """Mean response time of one server fed Poisson(rate) with Exp(1) work, over independent replications."""
    means = []
    for seed in range(replications):
        arrival, work = poisson_jobs(rate, n, seed)
        means.append(simulate(arrival, work, [server], lambda job, now: 0).response.mean())
    return float(np.mean(means))


def test_fcfs_equals_the_lindley_recursion_exactly():
    arrival, work = poisson_jobs(0.9, 20_000, seed=11)
    result = simulate(arrival, work, [FCFS_1], lambda job, now: 0)
    finish, previous = np.empty_like(arrival), 0.0
    for i, (a, w) in enumerate(zip(arrival, work, strict=True)):
        previous = max(a, previous) + w
        finish[i] = previous
    np.testing.assert_allclose(result.finish, finish, rtol=1e-9)


def test_io_device_is_a_fifo_queue_at_its_speed():
    """IO phases queue for the server's IO device one at a time (Lindley at io / io_speed); the CPU phase
    that follows is negligible here, and with io_speed unset the same phases overlap freely (pure delay)."""
    arrival, io = poisson_jobs(0.9, 20_000, seed=12, work=lambda rng, n: rng.exponential(2.0, n))
    work = np.full(len(arrival), 1e-12)
    disk = ServerModel(cpus=INF, max_workers=INF, backlog=INF, io_speed=2.0)
    result = simulate(arrival, work, [disk], lambda job, now: 0, io=io)
    finish, previous = np.empty_like(arrival), 0.0
    for i, (a, d) in enumerate(zip(arrival, io, strict=True)):
        previous = max(a, previous) + d / 2.0
        finish[i] = previous
    np.testing.assert_allclose(result.finish, finish, rtol=1e-9, atol=1e-9)
    assert result.response.mean() == pytest.approx(10.0, rel=0.1)  # M/M/1 at ρ = 0.9: 1 / (μ − λ)
    free = simulate(arrival, work, [ServerModel(cpus=INF, max_workers=INF, backlog=INF)], lambda j, t: 0, io=io)
    np.testing.assert_allclose(free.response, io, rtol=1e-9, atol=1e-9)


def test_mm1_fcfs_mean_response_time():
    assert mean_response(0.9, FCFS_1) == pytest.approx(10.0, rel=0.03)  # E[T] = 1 / (μ − λ)


def test_mmc_erlang_c():
    c, lam = 2, 1.8
    a = lam  # offered load in Erlangs, μ = 1
    rho = a / c
    top = a**c / math.factorial(c) / (1 - rho)
    erlang_c = top / (sum(a**k / math.factorial(k) for k in range(c)) + top)
    expected = erlang_c / (c - a) + 1.0
    assert expected == pytest.approx(5.2632, abs=1e-4)
    assert mean_response(lam, ServerModel(cpus=2, max_workers=2, backlog=INF)) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize(
    "work",
    [
        lambda rng, n: rng.exponential(1.0, n),
        lambda rng, n: rng.lognormal(-0.5, 1.0, n),  # mean exp(-0.5 + 1/2) = 1
        lambda rng, n: (rng.pareto(2.5, n) + 1) * 0.6,  # Lomax + 1 → Pareto(xm=0.6, α=2.5), mean 1
    ],
    ids=["exponential", "lognormal", "pareto"],
)
def test_mg1_processor_sharing_is_insensitive_to_the_work_distribution(work):
    rho = 0.7
    arrival, sizes = poisson_jobs(rho, 600_000, seed=5, work=work)
    assert sizes.mean() == pytest.approx(1.0, rel=0.02)
    result = simulate(arrival, sizes, [PS_1], lambda job, now: 0)
    assert result.response.mean() == pytest.approx(1.0 / (1 - rho), rel=0.03)  # E[S] / (1 − ρ)


def test_random_split_to_heterogeneous_ps_servers():
    """Poisson split ∝ speed: each server is M/M/1-PS at the same ρ, so E[T] = K / (Σμ (1 − ρ))."""
    speeds = [0.5, 1.0, 1.5, 2.0]
    total, rho = sum(speeds), 0.8
    arrival, work = poisson_jobs(rho * total, 600_000, seed=6)
    rng = np.random.default_rng(7)
    choice = rng.choice(len(speeds), size=len(arrival), p=np.array(speeds) / total)
    servers = [ServerModel(cpus=1, speed=s, max_workers=INF, backlog=INF) for s in speeds]
    result = simulate(arrival, work, servers, lambda job, now: int(choice[job]))
    k = len(speeds)
    assert result.response.mean() == pytest.approx(k / (total * (1 - rho)), rel=0.03)


def test_littles_law_holds_per_server():
    arrival, work = poisson_jobs(2.5, 200_000, seed=8)
    servers = [ServerModel(cpus=1), ServerModel(cpus=2)]
    result = simulate(arrival, work, servers, lambda job, now: job % 2)
    horizon = arrival[-1]
    for j in range(2):
        mine = (result.server == j) & ~result.rejected
        lam = mine.sum() / horizon
        # time-average number in system = ∫ N(t) dt / T = Σ sojourn / T
        mean_in_system = (result.finish[mine] - arrival[mine]).sum() / horizon
        assert mean_in_system == pytest.approx(lam * result.response[result.server[~result.rejected] == j].mean())
        assert mean_in_system > 0.5  # both servers were really loaded


def test_apache_limits_queue_then_reject():
    """Workers beyond 2 wait in a backlog of 3; the 6th concurrent request is rejected."""
    arrival = np.zeros(6) + np.arange(6) * 1e-6
    work = np.ones(6)
    result = simulate(arrival, work, [ServerModel(cpus=1, max_workers=2, backlog=3)], lambda job, now: 0)
    assert result.rejected.tolist() == [False] * 5 + [True]
    assert result.start[:2].tolist() == pytest.approx([0, 1e-6])
    assert np.all(result.start[2:5] >= 1.9)  # they started only when a worker freed up (two share one core)
    assert result.finish[0] == pytest.approx(2.0, abs=1e-5)  # two jobs of work 1 sharing one core


def test_a_lone_job_gets_a_quota_below_a_core_whole_and_at_most_one_core():
    """A testbed server is a CFS quota: a request alone runs at full core speed until the quota is spent, so
    on average it gets min(1 core, quota); several share the quota. The default caps a job at one `cpus`."""
    arrival = np.array([0.0, 10.0, 10.0, 20.0])
    work = np.array([0.05, 0.05, 0.05, 0.5])
    half_core = ServerModel(cpus=2, speed=0.25, max_workers=INF, backlog=INF, job_rate=0.5)  # 2 units × 0.25
    done = simulate(arrival, work, [half_core], lambda job, now: 0).response
    assert done[0] == pytest.approx(0.1)  # alone: the whole 0.5-core quota
    assert done[1] == done[2] == pytest.approx(0.2)  # two share it
    capped = ServerModel(cpus=2, speed=0.25, max_workers=INF, backlog=INF)
    assert simulate(arrival, work, [capped], lambda job, now: 0).response[0] == pytest.approx(0.2)
    four_cores = ServerModel(cpus=16, speed=0.25, max_workers=INF, backlog=INF, job_rate=1.0)
    assert simulate(arrival, work, [four_cores], lambda job, now: 0).response[3] == pytest.approx(0.5)
