"""Agent options are the user's; where a search keeps its state is the server's (issue 23, high 1-2).

``storage`` (a database URL the worker would open) and ``study_name`` (which could attach a job to
another job's Optuna study) were accepted as agent options; the service now supplies both through
``SearchEnv`` and refuses them from users."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunepilot.agents import create_agent
from prunepilot.compression import PrunePilotError

SPEC = {"arch": "resnet20", "dataset": "cifar10-jpeg", "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
        "search": {"max_evaluations": 3}}


@pytest.mark.parametrize("agent", ["optuna-tpe", "optuna-nsga2"])
@pytest.mark.parametrize("option", ["storage", "study_name"])
def test_server_side_names_are_not_agent_options(api, resnet20_weights: Path, tmp_path: Path, agent: str, option: str) -> None:
    target = tmp_path / "attacker.db"
    value = f"sqlite:///{target}" if option == "storage" else "job-0123456789abcdef0123456789abcdef"
    r = api.submit({**SPEC, "agent": agent, "agent_options": {option: value}}, resnet20_weights)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == f"unknown option(s) for agent {agent!r}: {option}; allowed: " + (
        "startup" if agent == "optuna-tpe" else "population")
    assert api.client.get("/v1/jobs", headers=api.headers()).json()["total"] == 0
    assert not target.exists()


def test_agents_do_not_advertise_server_side_names(api) -> None:
    agents = api.client.get("/v1/agents", headers=api.headers()).json()
    assert {a["name"] for a in agents} >= {"optuna-tpe", "optuna-nsga2"}
    for a in agents:
        assert not {"storage", "study_name"} & set(a["options"]), a


def test_the_agent_refuses_them_outside_the_service_too() -> None:
    with pytest.raises(PrunePilotError, match="unknown option"):
        create_agent("optuna-tpe", storage="sqlite:///x.db")


@pytest.mark.parametrize(("agent", "options", "message"), [
    ("optuna-tpe", {"startup": "abc"}, "agent 'optuna-tpe' option 'startup': Input should be a valid integer"),
    ("optuna-tpe", {"startup": 0}, "option 'startup': Input should be greater than 0"),
    ("optuna-nsga2", {"population": 1}, "option 'population': Input should be greater than or equal to 2"),
    ("amc", {"budget_mode": "tight"}, "option 'budget_mode': Input should be 'project' or 'bound'"),
    ("amc", {"sigma": -1}, "option 'sigma'"),
    ("amc", {"weights": {"energy": 1.0}}, "option 'weights'"),
    ("netadapt", {"decay": 1.5}, "option 'decay': Input should be less than or equal to 1"),
    ("sensitivity", {"points": [1]}, "option 'points'"),
])
def test_wrongly_typed_options_are_refused_at_submission(api, resnet20_weights: Path, agent: str, options: dict, message: str) -> None:
    """They used to be accepted and fail in the worker (int('abc')) after the data was decoded."""
    r = api.submit({**SPEC, "agent": agent, "agent_options": options}, resnet20_weights)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_well_typed_options_are_taken_as_their_type() -> None:
    agent = create_agent("optuna-tpe", startup="7")  # a CLI --option value arrives as text
    assert agent.options == {"startup": 7}
    assert create_agent("amc", recipe=None).options == {}  # None: unset
