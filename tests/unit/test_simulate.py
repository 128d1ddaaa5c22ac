"""The scenario simulator: deterministic, and our selector wins where it should."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from mulambda.tools import simulate as sim

# One fast model next to the client and one slow, far one of equal accuracy:
# round-robin sends half the traffic far away, so its p95 must be worse.
NEAR_AND_FAR = {
    "seed": 3,
    "requests": 800,
    "rate_per_s": 120,
    "jitter": 0.1,
    "nodes": ["edge", "cloud"],
    "network_ms": {"edge": {"edge": 0.5, "cloud": 40}, "cloud": {"cloud": 0.5}},
    "models": {
        "fast": {"service_ms": 4, "accuracy": 0.8, "concurrency": 2},
        "slow": {"service_ms": 30, "accuracy": 0.8, "concurrency": 2},
    },
    "executors": [
        {"name": "fast-edge", "model": "fast", "nodes": ["edge"]},
        {"name": "slow-cloud", "model": "slow", "nodes": ["cloud"]},
    ],
    "clients": [{"name": "cam", "node": "edge", "latency": 1, "accuracy": 1}],
}


def test_our_selector_beats_round_robin_on_p95():
    results = sim.simulate(NEAR_AND_FAR, selectors=("mulambda", "round-robin"))
    ours, rr = results["mulambda"], results["round-robin"]
    assert ours.p95 < rr.p95 / 2
    assert ours.used["fast-edge"] > 0.9 * len(ours.rtt_ms)
    assert rr.used == {"fast-edge": 400, "slow-cloud": 400}


def test_load_feedback_spills_over_when_the_fast_model_saturates():
    busy = dict(NEAR_AND_FAR, rate_per_s=900,
                network_ms={"edge": {"edge": 0.5, "cloud": 2}, "cloud": {"cloud": 0.5}})
    results = sim.simulate(busy, selectors=("mulambda", "lowest-network"))
    # 900/s is more than the fast model's 500/s: without feedback it queues.
    assert results["lowest-network"].used == {"fast-edge": 800}
    assert results["mulambda"].used["slow-cloud"] > 0
    assert results["mulambda"].p95 < results["lowest-network"].p95


def test_same_seed_same_figures_other_seed_other_stream():
    a = sim.simulate(NEAR_AND_FAR)
    b = sim.simulate(NEAR_AND_FAR)
    assert {k: v.as_dict() for k, v in a.items()} == {k: v.as_dict() for k, v in b.items()}
    c = sim.simulate(dict(NEAR_AND_FAR, seed=4), selectors=("random",))
    assert c["random"].rtt_ms != a["random"].rtt_ms


def test_bad_scenario_is_rejected_with_the_field():
    bad = dict(NEAR_AND_FAR, executors=[{"name": "x", "model": "nope", "nodes": ["edge"]}])
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        sim.simulate(bad)
    with pytest.raises(ValueError, match="bad scenario"):
        sim.simulate({"requests": 1})


def test_cli_reads_a_yaml_scenario(tmp_path, capsys):
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(NEAR_AND_FAR))
    parser = argparse.ArgumentParser()
    sim.configure(parser)
    assert sim.run(parser.parse_args(["--scenario", str(path), "--requests", "200",
                                      "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["selector"] for r in rows] == list(sim.SELECTORS)
    assert all(sum(r["used"].values()) == 200 for r in rows)
