"""What a learner trains on is what its policy is served: one observation through the training path (the
learner's own input encoding) and through the serving path (`rl:DIR` as a testbed LB's agent process builds
it from the spec the controller planned, for every LB index) gives the same network input, for SAC
(distr) and QMIX. And the controller plans an `rl:` LB from the policy's header without PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from marllb_cli.agents.factory import make_agent
from marllb_cli.agents.methods import resolve_method
from marllb_cli.config import load_config
from marllb_cli.deploy.base import LbStart, lb_plan
from marllb_cli.features import N_FEATURES
from marllb_cli.topology import plan
from tests.conftest import REPO

LOCAL_SMALL = REPO / "configs" / "local-small.yaml"


def observation(n_servers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    obs = rng.uniform(0.0, 0.5, size=(n_servers, N_FEATURES)).astype(np.float32)
    obs[:, 0] = rng.integers(0, 20, size=n_servers)  # on-going flows are counts
    return obs


def served_agents(policy_dir) -> list:
    """Each LB's agent as its agent process builds it: from the AgentSpec `lb_plan` writes for it."""
    config = load_config(LOCAL_SMALL)
    topology = plan(config.testbed)
    method = resolve_method(f"rl:{policy_dir}")
    agents = []
    for lb in topology.lbs:
        _, spec = lb_plan(config, topology, lb, LbStart(method), policy_dir)
        agents.append(make_agent(spec.method, spec.cpus, None, spec.lb_index, spec.n_lbs))
    return agents


def test_a_distr_policy_is_served_the_input_it_was_trained_on(trained):
    from marllb_cli.agents.rl.sac import SacHyper, SacLearner

    policy = trained("distr", "distr", LOCAL_SMALL)
    agents = served_agents(policy)
    n_servers = len(agents[0].weights)
    learner = SacLearner(n_servers, SacHyper(hidden=8), seed=0)
    for lb, agent in enumerate(agents):
        obs = observation(n_servers, lb)
        trained_input = learner.features(obs, learner.prev_action)
        served_input = agent.policy.input(obs)
        assert served_input.dtype == trained_input.dtype == np.float32
        np.testing.assert_array_equal(served_input, trained_input)


def test_a_qmix_policy_is_served_the_input_it_was_trained_on_by_every_lb(trained):
    from marllb_cli.agents.rl.qmix import QmixHyper, QmixLearner

    policy = trained("qmix", "qmix", LOCAL_SMALL)
    agents = served_agents(policy)
    assert len(agents) == 2  # local-small's two LBs; LB 0 could not load a QMIX policy before
    n_servers = len(agents[0].weights)
    learner = QmixLearner(len(agents), n_servers, QmixHyper(hidden=8), seed=0)
    observations = [observation(n_servers, lb) for lb in range(len(agents))]
    trained_inputs = learner.features(observations, learner.prev_actions)
    for lb, agent in enumerate(agents):
        np.testing.assert_array_equal(agent.policy.input(observations[lb]), trained_inputs[lb])
        assert agent.policy.input(observations[lb])[-len(agents) :].tolist() == np.eye(len(agents))[lb].tolist()


def test_the_controller_plans_an_rl_lb_from_the_policy_header_without_torch(trained):
    policy = trained("qmix", "qmix", LOCAL_SMALL, "residual=true")
    header = json.loads((policy / "policy.json").read_text())
    assert header["kind"] == "qmix" and header["n_agents"] == 2 and header["residual"] is True
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from marllb_cli.config import load_config\n"
        "from marllb_cli.deploy.base import LbStart, lb_plan\n"
        "from marllb_cli.topology import plan\n"
        f"config = load_config({str(LOCAL_SMALL)!r})\n"
        "topology = plan(config.testbed)\n"
        f"dataplane, agent = lb_plan(config, topology, topology.lbs[0], LbStart('rl:{policy}'), Path('lb'))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'method': dataplane.method,"
        " 'weights': dataplane.weights, 'cpus': agent.cpus}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    planned = json.loads(result.stdout)
    assert planned["torch"] is False and planned["method"] == "sed"
    # the middle of the default residual levels (0.8, 1, 1.25) times each server's capacity: SED's own weights
    assert planned["weights"] == pytest.approx(planned["cpus"])


def test_a_policy_for_other_lbs_is_refused_at_plan_time(trained):
    from marllb_cli.errors import ConfigError

    policy = trained("qmix", "qmix", LOCAL_SMALL)
    config = load_config(LOCAL_SMALL, ["testbed.lbs=1"])
    topology = plan(config.testbed)
    with pytest.raises(ConfigError, match="QMIX trained for 2 LBs, this config has 1"):
        lb_plan(config, topology, topology.lbs[0], LbStart(f"rl:{policy}"), policy)


def test_a_policy_on_neurips_observation_is_served_its_16_features(trained):
    """A distr policy trained with NeurIPS'22's observation: the testbed's agent process builds it to read 16
    features per server (it computes them with `observe_neurips`) and serves the input it was trained on."""
    from marllb_cli.agents.rl.sac import SacHyper, SacLearner
    from marllb_cli.features import N_NEURIPS_FEATURES

    policy = trained("distr", "neurips", LOCAL_SMALL, "neurips_obs=true")
    agents = served_agents(policy)
    n_servers = len(agents[0].weights)
    learner = SacLearner(n_servers, SacHyper(hidden=8, neurips_obs=True), seed=0)
    assert learner.n_in == n_servers * (N_NEURIPS_FEATURES + 3)
    rng = np.random.default_rng(5)
    obs = rng.uniform(0, 0.5, size=(n_servers, N_NEURIPS_FEATURES)).astype(np.float32)
    for agent in agents:
        assert agent.neurips_observation is True
        np.testing.assert_array_equal(agent.policy.input(obs), learner.features(obs, learner.prev_action))


def test_an_lbs_dataplane_keeps_samples_with_the_configs_probability(tmp_path):
    from pathlib import Path

    config = load_config(LOCAL_SMALL, ["experiment.reservoir_keep=0.05"])
    topology = plan(config.testbed)
    dataplane, _ = lb_plan(config, topology, topology.lbs[0], LbStart("sed"), Path("lb"))
    assert dataplane.reservoir_keep == 0.05
    default, _ = lb_plan(load_config(LOCAL_SMALL), topology, topology.lbs[0], LbStart("sed"), Path("lb"))
    assert default.reservoir_keep == 1.0
