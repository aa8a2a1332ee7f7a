"""``prefect server start`` (what ``make ui`` runs), with each dependency of the run graph listed once.

    python -m flows.ui [prefect server start's options]      (default: --host 127.0.0.1 --port 4200)

Prefect 3.8's query for a flow run's graph (``BaseQueryComponents.flow_run_graph_v2``, SQLite
and PostgreSQL alike) joins each task run once per entry of its ``task_inputs``, so a stage
with k upstream stages and p parameters is listed k + p times as the parent of each of its
children: the smoke grid's 96 dependencies came back as several hundred edges, and the UI
stops drawing arrows above 500. The query already removes such repeats for
``encapsulating``; this applies the same to ``parents`` and ``children``, in the server
process, before Prefect's own command line starts the server.
"""

from __future__ import annotations

import functools
import sys

DEFAULT_ARGS = ['--host', '127.0.0.1', '--port', '4200']


def list_each_edge_once() -> None:
    """Patch the server's graph query (idempotent) so that a node lists each parent and child once."""
    from prefect.server.database.query_components import BaseQueryComponents

    query = BaseQueryComponents.__dict__['flow_run_graph_v2']  # Prefect's descriptor, which injects the db
    if getattr(query, 'edges_listed_once', False):
        return

    @functools.wraps(query)
    async def flow_run_graph_v2(self, *args, **kwargs):
        graph = await query.__get__(self, type(self))(*args, **kwargs)
        for _, node in graph.nodes:
            node.parents = list({edge.id: edge for edge in node.parents}.values())
            node.children = list({edge.id: edge for edge in node.children}.values())
        return graph

    flow_run_graph_v2.edges_listed_once = True
    BaseQueryComponents.flow_run_graph_v2 = flow_run_graph_v2


def main(argv: list[str] | None = None) -> None:
    list_each_edge_once()
    from prefect.cli import app

    sys.argv = [sys.argv[0], 'server', 'start', *(DEFAULT_ARGS if argv is None else argv)]
    app()  # Prefect's own command line reads sys.argv


if __name__ == '__main__':
    main(sys.argv[1:] or None)
