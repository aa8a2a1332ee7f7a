"""How a run of the ``dvc-pipeline`` flow (:mod:`flows.pipeline`) shows in Prefect's UI.

* its name says what its stages did (``smoke · 48 restored · 2 failed``) and a tag tells a
  training run (``worked``) from a ``no-op``;
* a stage that did not run because an upstream one did not complete ends in a final state:
  Prefect leaves it Pending, which the UI draws as still running.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Cancelled

from flows.stage_task import NOT_READY
from flows.stages import StageResult

if TYPE_CHECKING:
    from flows.progress import RunProgress

__all__ = ['NOT_READY_WAIT_S', 'end_not_ready', 'name_ended_run', 'name_run']

#: Seconds to wait for the server to record the NotReady states it is to finalise.
NOT_READY_WAIT_S = 30.0


def name_run(name: str, tags: list[str]) -> None:
    """Rename the flow run (its list then tells a training run from a no-op) and add tags."""
    from prefect.client.orchestration import get_client

    flow_run = FlowRunContext.get().flow_run
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=name, tags=sorted({*flow_run.tags, *tags}))
    except Exception as exc:  # a name is a nicety: never fail a run over it
        get_run_logger().warning('could not rename the flow run: %s', exc)


def name_ended_run(label: str, results: list[StageResult]) -> None:
    """Name the run once it has ended after what its stages did, tagged ``no-op`` or ``worked``."""
    name_run(_outcome_name(label, results), [label, 'no-op' if _no_op(results) else 'worked'])


def _no_op(results: list[StageResult]) -> bool:
    return all(r.outcome == 'skipped' for r in results)


def _outcome_name(label: str, results: list[StageResult]) -> str:
    """The run's name once it has ended: ``smoke · 48 restored · 4 ran · 2 failed``."""
    counts: dict[str, int] = {}
    for r in results:
        outcome = 'up to date' if r.outcome == 'skipped' else r.outcome
        counts[outcome] = counts.get(outcome, 0) + 1
    order = ['failed', 'cancelled', 'not run', 'ran', 'restored', 'up to date']
    return ' · '.join([label] + [f'{counts[o]} {o}' for o in order if o in counts])


def end_not_ready(futures: dict, progress: RunProgress | None) -> None:
    """Prefect leaves a task whose upstream failed Pending, named NotReady, and the UI draws a
    pending task as still running; once the run is over, give each a final state of that name
    (and count it in the run's ``progress``). The server records task run states from events,
    later: wait (up to ``NOT_READY_WAIT_S``) until it has recorded each NotReady, so that the
    final state comes after it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    stage_of = {f.task_run_id: s for s, f in futures.items() if f.state.is_pending() and f.state.name == NOT_READY}
    if not stage_of:
        return
    deadline = time.monotonic() + NOT_READY_WAIT_S
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_task_runs(  # sort and limit given: the sync client sends nulls the server rejects
                task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(stage_of))),
                sort=TaskRunSort.ID_DESC,
                limit=len(stage_of),
            )
            recorded = [tr.id for tr in found if tr.state and tr.state.is_pending() and tr.state.name == NOT_READY]
            if len(recorded) == len(stage_of) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for task_run_id in recorded:
            message = 'not run: an upstream stage did not complete'
            client.set_task_run_state(task_run_id, Cancelled(name=NOT_READY, message=message), force=True)
            if progress is not None:
                progress.done(stage_of[task_run_id], 'not run')
