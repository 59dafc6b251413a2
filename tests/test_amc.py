from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from helpers.synthetic import SyntheticEvaluator

from prunepilot.agents import MemoryRecorder, SearchContext, SearchLimits, create_agent
from prunepilot.agents.amc import EpisodeRewardBuffer, truncated_normal
from prunepilot.compression import Evaluator, Fidelity, PrunePilotError, Pruner, PruningConstraints, build_model
from prunepilot.compression.cifar_resnet import RESIDUAL_ROOTS
from prunepilot.compression.measure import torch_threads
from prunepilot.envs import FEATURES, PruningEnv


@pytest.fixture(scope="module")
def synth20(resnet20) -> SyntheticEvaluator:
    return SyntheticEvaluator(Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32))


@pytest.fixture(scope="module")
def synth_mobilenet() -> SyntheticEvaluator:
    return SyntheticEvaluator(Pruner(build_model("mobilenet_v2"), "mobilenet_v2", 10, 32))


def test_env_passes_gymnasium_checks(synth20) -> None:
    env = PruningEnv(synth20, {"flops": 0.5})
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (len(FEATURES),) and obs.dtype == np.float32
    assert obs[0] == 0.0 and obs[-1] == 0.0  # first layer, no previous action


def test_env_is_seeded_and_reproducible(synth20) -> None:
    def rollout(seed: int) -> list[float]:
        env = PruningEnv(synth20, {"flops": 0.5})
        env.reset(seed=seed)
        env.action_space.seed(seed)
        rewards, done = [], False
        while not done:
            _, r, done, _, _ = env.step(env.action_space.sample())
            rewards.append(r)
        return rewards

    assert rollout(3) == rollout(3)
    assert rollout(3) != rollout(4)


@pytest.mark.parametrize("which", ["synth20", "synth_mobilenet"])
@pytest.mark.parametrize("limits", [{"flops": 0.5}, {"flops": 0.7, "params": 0.5}, {"size": 0.6}])
def test_random_actions_always_end_within_budget(which: str, limits: dict[str, float], request: pytest.FixtureRequest) -> None:
    ev = request.getfixturevalue(which)
    env = PruningEnv(ev, limits)
    rng = np.random.default_rng(0)
    for episode in range(15):
        env.reset(seed=episode)
        done = False
        while not done:
            _, _, done, _, info = env.step(np.array([rng.uniform(0, 0.8)], dtype=np.float32))
        res = env.budget.resources(info["ratios"])
        for resource, limit in limits.items():
            assert res[resource] <= limit * (1 + 1e-9), (episode, resource, res[resource])


def test_action_bounding_raises_actions_only_when_needed(synth20) -> None:
    env = PruningEnv(synth20, {"flops": 0.5}, fill=False)
    env.reset(seed=0)
    infos = []
    done = False
    while not done:
        _, _, done, _, info = env.step(np.array([0.0], dtype=np.float32))  # the agent asks to prune nothing
        infos.append(info)
    assert infos[0]["applied"] == 0.0  # early on, later layers can still absorb the budget
    assert infos[-1]["applied"] > 0.5  # the last layers are forced to make up the difference
    assert env.budget.resources(infos[-1]["ratios"])["flops"] <= 0.5


def test_rewards(synth20) -> None:
    outcome = {"accuracy": 0.8, "macs": 2e7, "macs_ratio": 0.5, "params_ratio": 0.4, "size_ratio": 0.45, "latency_ratio": None}
    assert PruningEnv(synth20, {"flops": 0.5}, reward="error").reward(outcome) == pytest.approx(-0.2)
    assert PruningEnv(synth20, {"flops": 0.5}, reward="error-log-flops").reward(outcome) == pytest.approx(-0.2 * np.log(2e7))
    combined = PruningEnv(synth20, {"flops": 0.5}, reward="combined", weights={"flops": 0.1, "size": 0.2})
    assert combined.reward(outcome) == pytest.approx(-0.2 - 0.05 - 0.09)
    with pytest.raises(ValueError, match="latency"):
        PruningEnv(synth20, {"flops": 0.5}, reward="combined", weights={"latency": 1.0}).reward(outcome)


def test_episode_reward_is_copied_to_every_transition(synth20) -> None:
    env = PruningEnv(synth20, {"flops": 0.5})
    buf = EpisodeRewardBuffer(100, env.observation_space, env.action_space, device="cpu")
    obs = np.zeros((1, len(FEATURES)), dtype=np.float32)
    act = np.zeros((1, 1), dtype=np.float32)
    for t in range(3):
        buf.add(obs, obs, act, np.array([0.0]), np.array([t == 2]), [{}])
        assert buf.pos == (0 if t < 2 else 3)  # nothing stored until the episode ends
    assert np.allclose(buf.rewards[:3], 0.0)
    for t in range(2):
        buf.add(obs, obs, act, np.array([-0.25 if t == 1 else 0.0]), np.array([t == 1]), [{}])
    assert np.allclose(buf.rewards[3:5], -0.25)
    batch = buf.sample(64)
    assert abs(float(batch.rewards.mean())) < 0.2  # a moving baseline is subtracted at sampling


def test_truncated_normal_stays_in_bounds() -> None:
    rng = np.random.default_rng(0)
    draws = truncated_normal(rng, np.full(10000, 0.75), 0.5, 0.0, 0.8)
    assert draws.min() >= 0.0 and draws.max() <= 0.8
    assert 0.4 < draws.mean() < 0.65  # pulled below mu by the upper bound


def test_ddpg_learns_on_a_synthetic_problem(resnet20) -> None:
    """Early layers are costly to prune, late ones cheap: DDPG must find that, uniform cannot."""
    # the 27 block-internal convs: a long chain of similar layers whose known optimum is steeply non-uniform
    inner = PruningConstraints(exclude=RESIDUAL_ROOTS)
    ev = SyntheticEvaluator(Pruner(build_model("resnet56"), "resnet56", 10, 32, inner))
    episodes = 120  # AMC leads uniform by ~0.10 and random by ~0.045 here (seeds 0-1; 300 episodes: the same)
    scores = {}
    with torch_threads(1):  # small matrices: a second thread only adds synchronisation
        for name in ("uniform", "random", "amc"):
            ctx = SearchContext(ev, {"flops": 0.5}, SearchLimits(max_evaluations=episodes), seed=0, agent=name)
            scores[name] = create_agent(name).search(ctx).best.accuracy
    assert scores["amc"] > scores["uniform"] + 0.04
    assert scores["amc"] > scores["random"] + 0.02


def test_amc_on_real_pruning_end_to_end(resnet20, mini_splits) -> None:
    ev = Evaluator(Pruner(copy.deepcopy(resnet20), "resnet20", 10, 32), mini_splits, Fidelity(val_images=100, calib_images=128))
    ctx = SearchContext(ev, {"flops": 0.5}, SearchLimits(max_evaluations=6), seed=0, agent="amc")
    result = create_agent("amc", warmup=2).search(ctx)
    assert result.trials == 6 and result.best.feasible and result.best.metrics["macs_ratio"] <= 0.5
    assert result.info["episodes"] == 6 and result.best.accuracy > 0.15  # chance is 0.1
    assert all(t.reward == pytest.approx(t.accuracy - 1.0) for t in ctx.recorder.existing())  # reward "error" = -error


def test_amc_resumes_from_its_saved_state(synth20, tmp_path) -> None:
    rec = MemoryRecorder()
    first = SearchContext(synth20, {"flops": 0.5}, SearchLimits(max_evaluations=12), rec, seed=1, agent="amc", state_dir=tmp_path)
    agent = create_agent("amc", warmup=4)
    # stop after 7 episodes, as a killed worker would
    first.search = SearchLimits(max_evaluations=7)  # type: ignore[misc]
    agent.search(first)
    best_before = first.best
    assert agent.episode == 7 and len(rec.trials) == 7
    again = SearchContext(synth20, {"flops": 0.5}, SearchLimits(max_evaluations=12), rec, seed=1, agent="amc", state_dir=tmp_path)
    agent2 = create_agent("amc", warmup=4, episodes=12)
    result = agent2.search(again)
    assert agent2.episode == 12  # the episode counter carried over
    assert [t.step for t in rec.trials] == list(range(12))  # nothing redone, nothing lost
    assert result.best.accuracy >= best_before.accuracy
    assert again.best is result.best


def test_amc_leaves_nothing_in_the_temp_dir(synth20, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where SB3's default logger would make its directory
    ctx = SearchContext(synth20, {"flops": 0.5}, SearchLimits(max_evaluations=3), seed=0, agent="amc")
    result = create_agent("amc", warmup=1).search(ctx)
    assert result.trials == 3
    assert list(tmp_path.iterdir()) == []


def test_amc_projects_by_default_and_starts_from_uniform(synth20) -> None:
    ctx = SearchContext(synth20, {"flops": 0.5}, SearchLimits(max_evaluations=5), seed=0, agent="amc")
    create_agent("amc", warmup=2, updates_per_step=3).search(ctx)
    uni = SearchContext(synth20, {"flops": 0.5}, SearchLimits(max_evaluations=1), seed=0, agent="uniform")
    create_agent("uniform").search(uni)
    trials = ctx.recorder.existing()
    assert trials[0].metrics["kept"] == uni.recorder.existing()[0].metrics["kept"]  # episode 0 is the uniform strategy
    assert len({tuple(t.metrics["kept"]) for t in trials}) > 1  # later episodes explore
    # projection lands every episode on the budget line, not below it as bounding often does
    assert all(0.48 <= t.metrics["macs_ratio"] <= 0.5 for t in trials)


@pytest.mark.parametrize(("recipe", "actor_lr", "warmup"), [("tuned", 1e-3, 4), ("paper", 1e-4, 10)])
def test_amc_recipes_set_actor_lr_and_warmup(synth20, recipe: str, actor_lr: float, warmup: int) -> None:
    ctx = SearchContext(synth20, {"flops": 0.5}, SearchLimits(max_evaluations=40), seed=0, agent="amc")
    agent = create_agent("amc", **({} if recipe == "tuned" else {"recipe": recipe}))
    result = agent.search(ctx)
    assert result.info["recipe"] == recipe and result.info["warmup"] == warmup  # its share of the 40 episodes
    assert agent.model.actor.optimizer.param_groups[0]["lr"] == actor_lr


def test_amc_refuses_an_unknown_recipe() -> None:
    with pytest.raises(PrunePilotError, match="unknown AMC recipe 'fast'.*paper.*tuned"):
        create_agent("amc", recipe="fast")  # at creation, which is when the API validates a job
