"""The ``dvc_pipeline`` Prefect flow against a tiny real DVC project (flows/testing.py).

Everything runs for real: git, ``dvc init``, ``dvc status``/``dvc repro`` subprocesses,
and a temporary Prefect server from ``prefect_test_harness`` (one for the session: it
takes a few seconds to start). Task runs and artifacts are read back through the Prefect
client, as the UI would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows import testing as demo
from flows.dvc_graph import load_pipeline
from flows.progress import parse_eta, parse_train_line

pytestmark = [
    pytest.mark.timeout(600),
    # DVC's own use of pygtrie, on every in-process index load
    pytest.mark.filterwarnings("ignore:_NoneStep.value will soon raise:DeprecationWarning"),
]


from conftest import run_flow  # noqa: E402  (fixtures prefect_api, _dvc_env live in conftest)


def state_names(task_runs) -> dict[str, str]:
    return {name: tr.state.name for name, tr in task_runs.items()}


def commands_run(root: Path) -> list[str]:
    return [name for name, what, _ in demo.read_run_log(root) if what == "start"]


# --------------------------------------------------------------------------- no Prefect


def test_progress_lines_of_mmengine():
    it = parse_train_line("... - mmengine - INFO - Iter(train) [ 2000/90000]  lr: 0.02  eta: 1 day, 2:03:04")
    assert it is not None and it.percent == pytest.approx(100 * 2000 / 90000)
    ep = parse_train_line("Epoch(train)  [3][ 50/100]  base_lr: 1.0e-02  time: 0.4", elapsed_s=10)
    assert ep is not None and ep.percent == pytest.approx(50.0)
    eta = parse_train_line("Epoch(train)  [3][ 50/100]  eta: 0:01:30  time: 0.4", elapsed_s=30)
    assert eta is not None and eta.percent == pytest.approx(25.0)
    assert parse_train_line("Epoch(val)  [3][ 50/100]  eta: 0:01:30") is None
    assert parse_train_line("nothing to see") is None
    assert parse_eta("eta: 2 days, 1:00:05") == 2 * 86400 + 3605


def test_dag_from_dvc_index(tmp_path):
    root = demo.make_project(tmp_path / "proj")
    pipe = load_pipeline(root)
    assert set(pipe.stages) == set(demo.STAGES)  # foreach expanded, real names
    edges = {(up, name) for name, ups in pipe.upstream.items() for up in ups}
    assert edges == set(demo.EDGES)  # incl. `left` depending on a file inside prepare's dir out
    order = list(pipe.stages)
    for up, down in demo.EDGES:
        assert order.index(up) < order.index(down)
    assert pipe.stages["report"].metrics == ("metrics.json",)
    assert set(pipe.select(["train"]).stages) == {"prepare", "left", "train@small", "train@large"}
    assert set(pipe.select(["right"]).stages) == {"prepare", "right"}
    with pytest.raises(ValueError, match="unknown DVC stage"):
        pipe.select(["nope"])


# --------------------------------------------------------------------------- the flow


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    """A fresh project run once; what the run produced, captured before other tests."""
    root = demo.make_project(tmp_path_factory.mktemp("first") / "proj")
    state, task_runs = run_flow(root)
    return {
        "root": root,
        "state": state,
        "task_runs": task_runs,
        "log": demo.read_run_log(root),
        "report": (root / "reports" / "results.md").read_text(),
    }


def test_first_run_runs_every_stage_in_dependency_order(first_run):
    assert first_run["state"].is_completed(), first_run["state"].message
    log = first_run["log"]
    starts = [name for name, what, _ in log if what == "start"]
    assert sorted(starts) == sorted(demo.STAGES)  # every command ran exactly once
    when = {(name, what): t for name, what, t in log}
    for up, down in demo.EDGES:
        assert when[(up, "end")] <= when[(down, "start")], f"{down} started before {up} ended"


def test_task_runs_are_named_after_stages(first_run):
    task_runs = first_run["task_runs"]
    assert set(task_runs) == set(demo.STAGES)  # train@small, train@large: expanded
    for name, tr in task_runs.items():
        assert tr.state.type.value == "COMPLETED" and tr.state.name == "Completed", (name, tr.state)


def test_artifacts_are_published(first_run):
    from prefect import get_client
    from prefect.client.schemas.objects import Artifact

    flow_run_id = first_run["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        # not client.read_artifacts(): it sends null for the filters not given, which the
        # server rejects (422), and an empty task-run filter drops flow-level artifacts
        response = client.request(
            "POST", "/artifacts/filter", json={"flow_runs": {"id": {"any_": [str(flow_run_id)]}}}
        )
    artifacts = Artifact.model_validate_list(response.json())
    by_key = {a.key: a for a in artifacts if a.key}
    assert by_key["report-results"].type == "markdown"
    assert by_key["report-results"].data == first_run["report"]
    assert "| report |" in first_run["report"]

    table = by_key["metrics-report"]
    assert table.type == "table"
    assert '"mAP"' in str(table.data) and "detail.mAP_50" in str(table.data)

    summary = by_key["dvc-pipeline-summary"].data
    for name in demo.STAGES:
        assert f"| `{name}` | ran |" in summary

    # train@* print three mmengine `Iter(train) [i/3]` lines: a progress artifact, at 100 %
    progress = by_key["progress-train-small"]
    assert progress.type == "progress" and float(progress.data) == pytest.approx(100.0)


def test_up_to_date_stages_are_skipped_and_changes_rerun_downstream(first_run):
    root = first_run["root"]
    log_before = (root / "run.log").read_text()

    state, task_runs = run_flow(root)
    assert state.is_completed(), state.message
    assert state_names(task_runs) == {name: "Skipped" for name in demo.STAGES}
    assert all(tr.state.is_completed() for tr in task_runs.values())
    # decided by `dvc status` up front (no `dvc repro` started, which would say the same)
    assert {tr.state.message for tr in task_runs.values()} == {"skipped: up to date"}
    assert (root / "run.log").read_text() == log_before  # no command re-executed

    (root / "right.txt").write_text("right input v2\n")
    state, task_runs = run_flow(root)
    assert state.is_completed(), state.message
    rerun = {"right", "report"}
    assert state_names(task_runs) == {n: ("Completed" if n in rerun else "Skipped") for n in demo.STAGES}
    new_lines = (root / "run.log").read_text()[len(log_before):]
    assert sorted(line.split()[0] for line in new_lines.splitlines() if " start " in line) == sorted(rerun)

    # back to the old input: DVC's run-cache has that run, restores it instead of running
    (root / "right.txt").write_text("right input v1\n")
    log_before = (root / "run.log").read_text()
    state, task_runs = run_flow(root, targets=["right"])
    assert state.is_completed(), state.message
    assert state_names(task_runs) == {"prepare": "Skipped", "right": "Restored"}
    assert (root / "run.log").read_text() == log_before

    # force: everything runs again, even though nothing changed
    state, task_runs = run_flow(root, targets=["right"], force=True)
    assert state.is_completed(), state.message
    assert state_names(task_runs) == {"prepare": "Completed", "right": "Completed"}


def test_failing_stage_stops_its_downstream_only(prefect_api, tmp_path):
    root = demo.make_project(tmp_path / "proj", fail="left")
    state, task_runs = run_flow(root)

    assert state.is_failed()
    assert "left" in state.message
    left = task_runs["left"].state
    assert left.is_failed()
    assert "DVC stage 'left' failed" in left.message and "exited with code 3" in left.message
    for name in ("train@small", "train@large", "report"):  # downstream of `left`
        assert not task_runs[name].state.is_completed() and not task_runs[name].state.is_failed()
        assert task_runs[name].state.name == "NotReady", (name, task_runs[name].state)
    for name in ("prepare", "right", "lonely"):  # other branches still ran
        assert task_runs[name].state.is_completed(), (name, task_runs[name].state)
    ran = commands_run(root)
    assert sorted(ran) == ["lonely", "prepare", "right"]  # `left` is `exit 3`: no step.py


def test_retries_and_concurrency(prefect_api, tmp_path):
    """retries=1 makes a stage that fails once pass; 2 stages at most run at a time."""
    slow = {"left": 1.0, "right": 1.0, "train@small": 1.0, "train@large": 1.0}
    root = demo.make_project(tmp_path / "proj", flaky="lonely", sleep=slow)
    state, task_runs = run_flow(root, max_concurrency=2, retries=1, retry_delay_seconds=0)
    assert state.is_completed(), state.message
    assert task_runs["lonely"].state.is_completed()
    assert task_runs["lonely"].run_count == 2
    assert (root / "counter-lonely.txt").read_text() == "2"

    # stage commands (run.log) never more than 2 at a time ...
    commands: dict[str, list[float]] = {}
    for name, what, t in demo.read_run_log(root):
        commands.setdefault(name, [0.0, 0.0])[0 if what == "start" else 1] = t
    assert peak_overlap(commands.values()) <= 2, commands
    # ... and the stage tasks (Prefect's start/end times) did run 2 at a time
    tasks = {n: (tr.start_time.timestamp(), tr.end_time.timestamp()) for n, tr in task_runs.items()}
    assert peak_overlap(tasks.values()) == 2, tasks


def peak_overlap(intervals) -> int:
    """Most intervals open at the same time (an end at t closes before a start at t)."""
    events = sorted((t, delta) for start, end in intervals for t, delta in ((start, 1), (end, -1)))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak
