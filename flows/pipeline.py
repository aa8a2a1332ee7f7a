"""Run the DVC pipeline as a Prefect flow: one Prefect task per DVC stage.

Usage::

    python -m flows.pipeline [--repo .] [--target STAGE ...] [--max-concurrency N]
                             [--retries N] [--retry-delay S] [--force]

Without ``PREFECT_API_URL`` Prefect starts a temporary local server for the run; with
``PREFECT_API_URL=http://127.0.0.1:4200/api`` (and ``prefect server start`` running) the
flow run, its task runs, logs and artifacts show in that server's UI.

What the flow does:

1. reads the stage graph through DVC's index (:func:`flows.dvc_graph.load_pipeline`):
   foreach/matrix stages come out expanded (``train@teacher_weak``); ``targets`` keeps
   those stages and everything upstream of them;
2. submits a task per stage, named after the stage, once all its upstream stages are done,
   at most ``max_concurrency`` running stages at a time; each task first asks
   ``dvc status <stage>`` whether the stage changed and, if not, ends in a Completed state
   named ``Skipped``; otherwise it runs ``dvc repro --single-item <stage>``, streaming
   every output line into the task's log (and mmengine training lines into a progress
   artifact). A non-zero exit fails the task (stage name, exit code, last lines of output
   in the message); the stages downstream of it end ``NotReady`` (Prefect's own state for
   a task whose ``wait_for`` upstream did not complete) without running, while
   independent branches go on;
3. publishes artifacts: the markdown reports (``reports/**.md`` outputs), a table per
   stage of its metrics files, and a summary table of the run; the flow run ends Failed
   when any stage failed or could not run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from flows.dvc_graph import (
    Pipeline,
    is_lock_error,
    load_pipeline,
    repro_command,
    stage_status,
    subprocess_env,
)
from flows.progress import parse_train_line

__all__ = [
    "RESTORED",
    "SKIPPED",
    "SUMMARY_KEY",
    "StageFailed",
    "dvc_pipeline",
    "main",
    "run_dvc_stage",
    "slug",
]

#: Name of the (Completed-type) state of a stage that was up to date and did not run.
SKIPPED = "Skipped"
#: Name of the (Completed-type) state of a stage DVC restored from its run-cache.
RESTORED = "Restored"
#: Key of the markdown artifact that summarises a run.
SUMMARY_KEY = "dvc-pipeline-summary"
#: Lines of stage output kept for the error message of a failed stage.
TAIL_LINES = 20
#: How long a stage waits for another DVC process to release the repository lock.
LOCK_WAIT_S = 300.0


class StageFailed(RuntimeError):
    """``dvc repro`` of a stage exited with a non-zero code."""

    def __init__(self, stage: str, exit_code: int, tail: list[str], command_exit: int | None):
        self.stage, self.exit_code, self.tail, self.command_exit = stage, exit_code, tail, command_exit
        which = f"its command exited with code {command_exit}; " if command_exit is not None else ""
        lines = "\n".join(tail) if tail else "(no output)"
        super().__init__(
            f"DVC stage '{stage}' failed: {which}`dvc repro` exit code {exit_code}.\n"
            f"Last {len(tail)} lines of output:\n{lines}"
        )


def slug(text: str) -> str:
    """An artifact key: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


# --------------------------------------------------------------------------- the task


class _Progress:
    """Keeps a progress artifact of a training stage in step with its log lines."""

    MIN_STEP = 1.0  # percentage points between two updates
    MIN_INTERVAL_S = 5.0

    def __init__(self, stage: str):
        self.stage = stage
        self.key = f"progress-{slug(stage)}"
        self.artifact_id = None
        self.started = time.monotonic()
        self.last_pct = -1.0
        self.last_time = 0.0

    def feed(self, line: str) -> None:
        now = time.monotonic()
        progress = parse_train_line(line, elapsed_s=now - self.started)
        if progress is None:
            return
        pct = max(0.0, min(100.0, progress.percent))
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=pct,
                key=self.key,
                description=f"Training progress of DVC stage `{self.stage}`: {progress.description}",
            )
        elif abs(pct - self.last_pct) >= self.MIN_STEP and now - self.last_time >= self.MIN_INTERVAL_S:
            update_progress_artifact(
                artifact_id=self.artifact_id,
                progress=pct,
                description=f"Training progress of DVC stage `{self.stage}`: {progress.description}",
            )
        else:
            return
        self.last_pct, self.last_time = pct, now

    def finish(self) -> None:
        if self.artifact_id is not None and self.last_pct < 100.0:
            update_progress_artifact(
                artifact_id=self.artifact_id,
                progress=100.0,
                description=f"Training progress of DVC stage `{self.stage}`: done",
            )


def _stop(proc: subprocess.Popen) -> None:
    """Terminate ``dvc repro`` and the stage command it started, if still running.

    The child stays in our process group (Ctrl-C in a terminal reaches the stage command,
    as with a plain ``dvc repro``), so its process tree is found with psutil (a DVC
    dependency) rather than killed as a group.
    """
    if proc.poll() is not None:
        return
    try:
        import psutil

        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except Exception:
        procs = []
    for p in procs or [proc]:
        try:
            p.terminate()
        except Exception:
            pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    for p in procs or [proc]:
        try:
            p.kill()
        except Exception:
            pass
    proc.wait()


def _stream_repro(stage: str, repo_dir: str, force: bool, logger, progress: _Progress):
    """Run ``dvc repro --single-item`` once; log each line as it arrives.

    Returns ``(exit code, all lines)``.
    """
    cmd = repro_command(stage, force=force)
    logger.info("$ %s", " ".join(["dvc", *cmd[3:]]))  # cmd: python -m dvc ...
    proc = subprocess.Popen(
        cmd,
        cwd=repo_dir,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            # a progress bar redraws with "\r": keep what a terminal would show last
            parts = [p for p in raw.rstrip(b"\r\n").split(b"\r") if p.strip()]
            if not parts:
                continue
            line = parts[-1].decode("utf-8", errors="replace").rstrip()
            lines.append(line)
            logger.info(line)
            try:
                progress.feed(line)
            except Exception as exc:  # progress is a nicety; never fail a stage over it
                logger.warning("could not update the progress artifact: %s", exc)
        return proc.wait(), lines
    finally:
        _stop(proc)


@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False)
def run_dvc_stage(stage: str, repo_dir: str, force: bool = False) -> State:
    """Bring one DVC stage up to date (see the module docstring)."""
    logger = get_run_logger()
    if not force:
        changes = stage_status(repo_dir, stage, lock_wait_s=LOCK_WAIT_S)
        if not changes:
            logger.info("Stage '%s' is up to date (dvc status): skipped", stage)
            return Completed(name=SKIPPED, message="skipped: up to date")
        logger.info("Stage '%s' changed: %s", stage, json.dumps(changes))

    progress = _Progress(stage)
    deadline = time.monotonic() + LOCK_WAIT_S
    delay = 1.0
    while True:
        code, lines = _stream_repro(stage, repo_dir, force, logger, progress)
        text = "\n".join(lines)
        started = any(line.startswith("Running stage") for line in lines)
        if code != 0 and not started and is_lock_error(text) and time.monotonic() < deadline:
            logger.info("the DVC repository is locked by another DVC process; retrying in %.0f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
            continue
        break

    if code != 0:
        # DVC's own last words: "ERROR: failed to reproduce 'x': failed to run: CMD, exited with 3"
        command_exit = None
        for line in reversed(lines):
            m = re.search(r"exited with (-?\d+)\s*$", line)
            if line.startswith("ERROR") and m:
                command_exit = int(m.group(1))
                break
        raise StageFailed(stage, code, lines[-TAIL_LINES:], command_exit)
    try:
        progress.finish()
    except Exception as exc:
        logger.warning("could not update the progress artifact: %s", exc)
    if re.search(r"is cached - skipping run", text):
        return Completed(name=RESTORED, message="restored from the DVC run-cache")
    if re.search(r"didn't change, skipping", text):
        return Completed(name=SKIPPED, message="skipped: up to date (dvc repro)")
    return Completed(message="ran")


# --------------------------------------------------------------------------- results


def _result_of(state: State | None) -> str:
    if state is None:
        return "not run"
    if state.is_completed():
        if state.name == SKIPPED:
            return "skipped"
        if state.name == RESTORED:
            return "restored"
        return "ran"
    if state.is_failed() or state.is_crashed():
        return "failed"
    if state.name == "NotReady":
        return "not run (upstream failed)"
    return f"not run ({state.name})"


def _details(result: str, state: State | None) -> str:
    """What the summary says about a stage beyond its result: why it did not run."""
    if state is None or result == "ran" or not state.message:
        return ""
    if result == "failed":  # "Task run encountered an exception StageFailed: DVC stage ..."
        message = state.message.split("StageFailed: ", 1)[-1]
        return message.split("\nLast ")[0].strip()
    return state.message.splitlines()[0]


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _summary_markdown(pipeline: Pipeline, rows: list[dict[str, Any]], targets, force) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        key = row["result"].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    lines = [
        "# DVC pipeline run",
        "",
        f"Repository `{pipeline.root}`; targets: "
        + (", ".join(f"`{t}`" for t in targets) if targets else "all stages")
        + ("; forced re-run" if force else ""),
        "",
        "| Stage | Result | Duration | Details |",
        "|---|---|---|---|",
    ]
    for row in rows:
        details = row["message"] or ""
        if len(details) > 200:
            details = details[:200] + "..."
        lines.append(
            f"| `{row['stage']}` | {row['result']} | {_fmt_duration(row['duration_s'])} | {_cell(details)} |"
        )
    lines += ["", ", ".join(f"{n} {k}" for k, n in counts.items())]
    return "\n".join(lines) + "\n"


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = []
        for i, v in enumerate(value):
            out += _flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix or "value", value)]


def _read_metrics(path: Path) -> Any:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def _publish_artifacts(pipeline: Pipeline, results: dict[str, str], logger) -> list[str]:
    """Markdown reports and metrics tables of the stages that completed; returns keys."""
    keys: list[str] = []
    done = {name for name, result in results.items() if not result.startswith(("failed", "not run"))}

    for name in pipeline.stages:
        if name not in done:
            continue
        for out in pipeline.stages[name].outs:
            path = pipeline.root / out
            if not (out == "reports" or out.startswith("reports/")):
                continue
            files = sorted(path.rglob("*.md")) if path.is_dir() else [path]
            for file in files:
                if file.suffix.lower() != ".md" or not file.is_file():
                    continue
                rel = file.relative_to(pipeline.root / "reports").with_suffix("").as_posix()
                key = f"report-{slug(rel)}"
                create_markdown_artifact(
                    markdown=file.read_text(),
                    key=key,
                    description=f"`{file.relative_to(pipeline.root).as_posix()}`, output of DVC stage `{name}`",
                )
                keys.append(key)

    per_stage: dict[str, list[str]] = {name: list(st.metrics) for name, st in pipeline.stages.items()}
    loose: list[str] = []
    for path, producer in pipeline.top_level_metrics.items():
        if producer is None:
            loose.append(path)
        elif producer in per_stage and path not in per_stage[producer]:
            per_stage[producer].append(path)
    groups = [(f"metrics-{slug(n)}", n, paths) for n, paths in per_stage.items() if n in done and paths]
    groups += [(f"metrics-{slug(p)}", None, [p]) for p in loose]
    for key, stage, paths in groups:
        rows = []
        for rel in paths:
            path = pipeline.root / rel
            if not path.is_file():
                continue
            try:
                data = _read_metrics(path)
            except Exception as exc:
                logger.warning("cannot read metrics file %s: %s", rel, exc)
                continue
            rows += [{"file": rel, "metric": k, "value": v} for k, v in _flatten(data)]
        if rows:
            origin = f"DVC stage `{stage}`" if stage else "dvc.yaml `metrics:`"
            create_table_artifact(table=rows, key=key, description=f"Metrics of {origin}")
            keys.append(key)
    return keys


# --------------------------------------------------------------------------- the flow


@flow(name="dvc-pipeline")
def dvc_pipeline(
    repo_dir: str = ".",
    targets: list[str] | None = None,
    max_concurrency: int = 1,
    retries: int = 0,
    retry_delay_seconds: float = 10,
    force: bool = False,
) -> Any:
    """Bring the DVC pipeline of ``repo_dir`` up to date, one Prefect task per stage."""
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")
    logger = get_run_logger()
    pipeline = load_pipeline(repo_dir).select(targets)
    root = str(pipeline.root)
    logger.info(
        "DVC pipeline in %s: %d stage(s) in dependency order: %s",
        root, len(pipeline.stages), ", ".join(pipeline.stages),
    )

    waiting = list(pipeline.stages)  # topological order
    futures: dict[str, Any] = {}
    running: dict[concurrent.futures.Future, str] = {}
    states: dict[str, State] = {}
    started: dict[str, float] = {}
    durations: dict[str, float | None] = {}

    def submit(name: str) -> None:
        escaped = name.replace("{", "{{").replace("}", "}}")  # task_run_name is a format string
        stage_task = run_dvc_stage.with_options(
            name=name,
            task_run_name=escaped,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
        )
        future = stage_task.submit(
            name, root, force, wait_for=[futures[up] for up in pipeline.upstream[name]]
        )
        futures[name] = future
        started[name] = time.monotonic()
        running[future.wrapped_future] = name

    while waiting or running:
        busy = sum(1 for n in running.values() if all(states[u].is_completed() for u in pipeline.upstream[n]))
        for name in list(waiting):
            ups = pipeline.upstream[name]
            if not all(up in states for up in ups):
                continue
            blocked = not all(states[up].is_completed() for up in ups)
            # a stage with a failed upstream ends at once (NotReady): no slot needed
            if not blocked and busy >= max_concurrency:
                continue
            waiting.remove(name)
            submit(name)
            busy += 0 if blocked else 1
        if not running:  # cannot happen with a DAG; guard against an endless loop
            raise RuntimeError(f"no runnable stage among {waiting}")
        done, _ = concurrent.futures.wait(list(running), return_when=concurrent.futures.FIRST_COMPLETED)
        for wrapped in done:
            name = running.pop(wrapped)
            durations[name] = time.monotonic() - started[name]
            futures[name].wait()  # sets the future's final state from the task engine's
            states[name] = futures[name].state  # (reading it before asks the API: may lag)

    rows = []
    for name in pipeline.stages:
        state = states.get(name)
        result = _result_of(state)
        blockers = [up for up in pipeline.upstream[name] if up in states and not states[up].is_completed()]
        details = _details(result, state)
        if result.startswith("not run") and blockers:
            details = "upstream stage(s) did not complete: " + ", ".join(f"`{b}`" for b in sorted(blockers))
        rows.append(
            {
                "stage": name,
                "result": result,
                "state": state.name if state else None,
                "duration_s": durations.get(name) if not result.startswith("not run") else None,
                "message": details,
            }
        )
        logger.info("stage %-30s %s", name, result)
    results = {row["stage"]: row["result"] for row in rows}

    try:
        artifact_keys = _publish_artifacts(pipeline, results, logger)
    except Exception as exc:  # artifacts are a report, not the pipeline: do not fail over them
        logger.warning("could not publish the report/metrics artifacts: %s", exc)
        artifact_keys = []
    markdown = _summary_markdown(pipeline, rows, targets, force)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_KEY, description="DVC stages of this run")
    logger.info("summary:\n%s", markdown)

    summary = {
        "repo_dir": root,
        "stages": rows,
        "artifacts": artifact_keys + [SUMMARY_KEY],
        "markdown": markdown,
    }
    bad = [row["stage"] for row in rows if row["result"].startswith(("failed", "not run"))]
    if bad:
        failed = [r["stage"] for r in rows if r["result"] == "failed"]
        not_run = [r["stage"] for r in rows if r["result"].startswith("not run")]
        message = f"{len(failed)} DVC stage(s) failed: {', '.join(failed) or '-'}"
        if not_run:
            message += f"; not run: {', '.join(not_run)}"
        summary["failed"] = True
        return Failed(message=message, data=summary)
    summary["failed"] = False
    return summary


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="Run the DVC pipeline as a Prefect flow (one task per DVC stage). "
        "Set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) to record the run in a "
        "running Prefect server; without it Prefect uses a temporary local server.",
    )
    parser.add_argument("--repo", default=".", help="DVC repository (default: .)")
    parser.add_argument(
        "--target", action="append", default=[], metavar="STAGE",
        help="run only this stage (or foreach group) and its upstream; repeatable",
    )
    parser.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                        help="independent stages run at the same time (default: 1)")
    parser.add_argument("--retries", type=int, default=0, metavar="N",
                        help="retries of a failed stage (default: 0)")
    parser.add_argument("--retry-delay", type=float, default=10.0, metavar="S",
                        help="seconds between retries (default: 10)")
    parser.add_argument("--force", action="store_true", help="re-run every stage, changed or not")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # the temporary server Prefect starts without PREFECT_API_URL inherits this; its
    # telemetry heartbeat has no network to reach and logs sqlite lock errors instead
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    state = dvc_pipeline(
        repo_dir=args.repo,
        targets=args.target or None,
        max_concurrency=args.max_concurrency,
        retries=args.retries,
        retry_delay_seconds=args.retry_delay,
        force=args.force,
        return_state=True,
    )
    try:
        summary = state.result(raise_on_failure=False)
    except Exception:
        summary = None
    if isinstance(summary, dict) and "markdown" in summary:
        print(summary["markdown"])
    print(f"flow run {state.name}: {state.message or ''}".rstrip(": "))
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
