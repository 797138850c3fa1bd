"""`kiln search` on Ray: embedded, resumed, with failing and timed-out trials, and on a two-node
cluster with a worker node killed mid-search. Slow: each starts Ray and compiles tiny models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_kiln

pytestmark = pytest.mark.slow

# Small and fast: 4 recipes of RTN weights; a trial is about 10 s on tiny-llama.
SPACE = """
name = "small"
base = "fp32"
[[passes]]
name = "quantize-weights"
bits = { choice = [4, 8] }
block_size = { choice = [32, 64] }
method = "rtn"
include_lm_head = true
budget = 5.0
"""

# drop-layers after the KV cache fails in one line: a trial that crashes.
FAILING = SPACE + """
[[passes]]
name = "drop-layers"
optional = true
target_params = 0.5
"""


def _space(tmp_path: Path, text: str = SPACE) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def _records(out: Path, repeats: bool = False) -> list[dict]:
    """The trials' records; without `repeats`, those of distinct recipes (what --trials counts)."""
    records = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/record.json"))]
    return records if repeats else [r for r in records if r.get("duplicate_of") is None]


def test_embedded_search_writes_the_front_and_a_best_recipe_that_reproduces_its_artifact(tmp_path):
    out = tmp_path / "s"
    proc = run_kiln("search", "tiny-llama", "-o", str(out), "--space", str(_space(tmp_path)), "--trials", "3",
                    "--max-ppl-increase", "5%", "--objective", "size", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    records = _records(out)
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    table = (out / "pareto.md").read_text()
    assert "**best**" in table and table.count("\n| ") == 1 + 1 + len(_records(out, repeats=True))  # header, ref
    assert (out / "pareto-size.png").stat().st_size > 1000 and (out / "pareto-speed.png").stat().st_size > 1000
    best = min(records, key=lambda r: (r["size_mb"], r["quality"]["ppl_increase"]))
    assert f"| {best['number']} | ok | **best** |" in table
    assert best["quality"]["ppl_increase"] <= 0.05
    assert not any((out / "trials").glob("*/artifact"))  # only best/ is kept

    # The recipe reproduces the artifact: same size, same perplexity by `kiln eval`.
    again = tmp_path / "again"
    assert run_kiln("compile", "tiny-llama", "-r", str(out / "best.toml"), "-o", str(again), "-q").returncode == 0
    size = sum(f.stat().st_size for f in again.rglob("*") if f.is_file()) / 1e6
    assert abs(size - best["size_mb"]) < 1e-3
    evaluated = json.loads(run_kiln("eval", str(again), "--json").stdout)
    assert evaluated["perplexity"] == pytest.approx(best["quality"]["perplexity"], rel=1e-4)
    best_dir = json.loads(run_kiln("eval", str(out / "best"), "--json").stdout)
    assert best_dir["perplexity"] == pytest.approx(best["quality"]["perplexity"], rel=1e-4)


def test_failed_and_timed_out_trials_are_recorded_and_resume_runs_only_the_rest(tmp_path):
    out = tmp_path / "s"
    space = _space(tmp_path, FAILING)
    proc = run_kiln("search", "tiny-llama", "-o", str(out), "--space", str(space), "--trials", "4", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    records = _records(out)
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and all("drop-layers" in r["reason"] and "KV cache" in r["reason"] for r in failed)
    assert all(r["params"].get("1:drop-layers.on") for r in failed)
    assert any(r["status"] == "ok" for r in records)
    first = {p.parent.name: p.read_text() for p in (out / "trials").glob("*/record.json")}
    reference = (out / "reference" / "record.json").stat().st_mtime

    proc = run_kiln("search", "tiny-llama", "-o", str(out), "--trials", "6", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert len(_records(out)) == 6
    assert (out / "reference" / "record.json").stat().st_mtime == reference  # not compiled again
    for name, text in first.items():  # the finished trials are kept as they were
        assert (out / "trials" / name / "record.json").read_text() == text

    timed = tmp_path / "t"
    proc = run_kiln("search", "tiny-llama", "-o", str(timed), "--space", str(space), "--trials", "2",
                    "--trial-timeout", "1s")
    assert proc.returncode == 1 and "no trial met every budget" in proc.stderr
    assert [r["reason"] for r in _records(timed)] == ["over the trial time limit of 1 s"] * 2


def test_the_time_budget_stops_the_search_and_resume_runs_the_stopped_trial(tmp_path):
    out = tmp_path / "s"
    proc = run_kiln("search", "tiny-llama", "-o", str(out), "--space", str(_space(tmp_path)), "--trials", "4",
                    "--time-budget", "25s")
    assert proc.returncode in (0, 1), proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    finished = _records(out)
    assert len(finished) < 4 and all(r["status"] == "ok" for r in finished)
    # Usually a trial is running at the deadline; unless it finishes in the same poll, it is stopped.
    first = proc.stderr
    stopped = re.search(r"trial (\d+): stopped by the search's time budget", first)
    if stopped:
        assert not (out / "trials" / f"{int(stopped.group(1)):04d}").exists()
    proc = run_kiln("search", "tiny-llama", "-o", str(out), "--trials", "4", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert len(_records(out)) == 4 and all(r["status"] == "ok" for r in _records(out))
    if stopped:  # the stopped trial's choices run first
        choices = re.search(rf"trial {stopped.group(1)}: started (\(.*\))", first).group(1)
        assert re.search(r"trial \d+: started (\(.*\))", proc.stderr).group(1) == choices


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_share_the_trials_and_a_killed_worker_node_costs_only_its_running_trial(tmp_path):
    """`ray start --head` plus a second node as its own process on this machine, one CPU each;
    the worker node is killed while it runs a trial, which Ray retries on the head."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Token authentication off: Ray 2.5x turns it on for a local head when ~/.ray/auth_token exists.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    ray = str(Path(sys.executable).parent / "ray")
    # Each node in a session of its own, so the test stops exactly its nodes (never `ray stop`,
    # which stops every Ray instance on the machine).
    nodes = [subprocess.Popen([ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                               "--block"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        _node_with("CPU", address, env)  # the head is up
        nodes.append(subprocess.Popen([ray, "start", f"--address={address}", "--num-cpus=1", "--resources",
                                       '{"kiln_test_worker": 1}', "--block"], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        worker = nodes[-1]
        worker_node = _node_with("kiln_test_worker", address, env)
        out = tmp_path / "s"
        search = subprocess.Popen([sys.executable, "-m", "kiln.cli", "search", "tiny-llama", "-o", str(out),
                                   "--space", str(_space(tmp_path)), "--trials", "4", "--objective", "size",
                                   "--address", address, "--trial-cpus", "1"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Kill the worker node while it runs a trial.
        killed, deadline = False, time.monotonic() + 600
        while time.monotonic() < deadline and search.poll() is None and not killed:
            time.sleep(0.2)
            if worker_node in _nodes(out)["running"]:
                os.killpg(worker.pid, 9)
                killed = True
        assert killed, f"no trial ran on the worker node: {search.stderr.read() if search.poll() is not None else ''}"
        stdout, stderr = search.communicate(timeout=900)
        assert search.returncode == 0, stderr
        records = _records(out)
        assert len(records) == 4 and all(r["status"] == "ok" for r in records), records
        started = _nodes(out)["started"]
        cut = [trial for trial, nodes in started.items() if nodes[0] == worker_node and len(nodes) > 1]
        assert cut, started  # the trial the kill cut short started again ...
        for trial in cut:  # ... on the head, and finished there
            assert started[trial][-1] != worker_node
            assert json.loads((out / "trials" / trial / "record.json").read_text())["node"] == started[trial][-1]
        assert len({n for nodes in started.values() for n in nodes}) == 2  # both nodes ran trials
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
    # The same recipes measured on one node give the same quality (speed may differ).
    alone = tmp_path / "alone"
    proc = run_kiln("search", "tiny-llama", "-o", str(alone), "--space", str(_space(tmp_path)), "--trials", "4",
                    "--objective", "size")
    assert proc.returncode == 0, proc.stderr
    quality = {json.dumps(r["params"], sort_keys=True): r["quality"] for r in _records(alone)}
    common = [r for r in records if json.dumps(r["params"], sort_keys=True) in quality]
    assert common
    for r in common:
        assert r["quality"] == quality[json.dumps(r["params"], sort_keys=True)]


def _node_with(resource: str, address: str, env: dict) -> str:
    """The id of the node that has `resource`, once it has joined the cluster."""
    script = ("import time, ray\n"
              "for _ in range(60):\n"
              "    try:\n"
              f"        ray.init(address='{address}', logging_level='ERROR'); break\n"
              "    except Exception: time.sleep(1)\n"
              "for _ in range(120):\n"
              f"    ids = [n['NodeID'] for n in ray.nodes() if n['Alive'] and '{resource}' in n['Resources']]\n"
              "    if ids: print(ids[0]); break\n"
              "    time.sleep(0.5)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.stdout.strip(), proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _nodes(out: Path) -> dict:
    """The nodes each trial started on, in order (trials/N/started-*.json), and the node of each
    trial still running."""
    started, running = {}, []
    for path in (out / "trials").glob("*/started-*.json") if (out / "trials").is_dir() else []:
        started.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    for trial, starts in started.items():
        starts.sort(key=lambda s: s["time"])
        started[trial] = [s["node"] for s in starts]
        if not (out / "trials" / trial / "record.json").exists():
            running.append(started[trial][-1])
    return {"started": started, "running": running}
