"""The ServerApp: one round of one-shot FL over real SuperNodes, then fedmitr's server methods.

1. Wait (``connect-timeout``) until ``num-clients`` SuperNodes are connected.
2. Handshake (``query``): every node says which client (``partition-id``) it is.
3. The one round (``train``): send the config and the initial weights to each client's node and
   collect the trained weights for ``reply-timeout`` seconds. A node that raises, fails or does not
   answer in time is left out and reported; the run goes on when at least ``min-replies`` clients
   replied.
4. ``fedmitr.pipeline.serve``: every method of the run on the clients that replied, evaluated on the
   server's own test split; the run directory is the one ``fedmitr run`` writes (``config.json``,
   ``metrics.json``, ``clients/``, ``models/``, ``synthetic/``), and ``metrics.json`` has a
   ``flower`` section: which clients replied, which are missing and why.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmitr_flower import task

app = ServerApp()

POLL_SECONDS = 0.5  # how often the server asks the SuperLink which nodes are connected
HANDSHAKE_TIMEOUT = 120.0  # at most this long (or reply-timeout if shorter) for the handshake replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, context.run_config)


def run(grid: Grid, run_config: dict[str, Any]) -> Path:
    """The whole server side of a Flower run; returns the run directory."""
    from fedmitr.cli import ProgressPrinter, default_out, results_table
    from fedmitr.events import fan_out
    from fedmitr.pipeline import prepare, serve
    from fedmitr.rundir import RunDir, check_out_dir

    t_start = time.perf_counter()
    cfg = task.config_from_run_config(run_config)
    settings = task.run_settings(run_config, cfg)
    connect_timeout, reply_timeout, min_replies = (settings.connect_timeout, settings.reply_timeout,
                                                   settings.min_replies)
    out = check_out_dir(Path(settings.out_dir) if settings.out_dir else
                        Path("runs") / f"flower-{default_out(cfg).name}")
    printer = ProgressPrinter(brief=True, stream=sys.stderr)

    t0 = time.perf_counter()
    prepared = prepare(cfg)  # the server's data (it reports on the test split) and the initial weights
    data_seconds = time.perf_counter() - t0
    k_total = cfg.data.num_clients
    _say(f"fedmitr: {cfg.data.dataset}, {k_total} clients, alpha={cfg.data.alpha}, seed={cfg.seed}, "
         f"methods={','.join(cfg.methods)}; run directory {out}")

    report = Report(k_total, connect_timeout, reply_timeout, min_replies)
    t0 = time.perf_counter()
    nodes = wait_for_nodes(grid, k_total, connect_timeout)
    report.nodes = sorted(nodes)
    report.seconds["connect"] = time.perf_counter() - t0
    _say(f"{len(nodes)} SuperNode(s) connected after {report.seconds['connect']:.1f} s")
    t0 = time.perf_counter()
    assigned = handshake(grid, nodes, min(reply_timeout, HANDSHAKE_TIMEOUT), report)
    report.seconds["handshake"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    replies = train_round(grid, assigned, cfg, prepared.dataset, prepared.init, timeout=reply_timeout, report=report)
    round_seconds = report.seconds["round"] = time.perf_counter() - t0
    for k in range(k_total):
        if k not in assigned and not report.is_missing(k):
            report.missing_client(k, None, "not connected", "no SuperNode with this partition-id answered")
    _say(report.summary())
    if len(replies) < min_replies:
        raise RuntimeError(f"only {len(replies)} of {k_total} clients replied, fewer than min-replies={min_replies}; "
                           + report.summary())

    fed = federation(cfg, prepared.dataset, replies, {"data": data_seconds, "clients": round_seconds})
    run_dir = RunDir(out)
    result = serve(cfg, fed, run_dir=run_dir, on_event=fan_out(run_dir.record, printer), privacy=False,
                   extra_metrics={"flower": report.to_dict()}, started=t_start)
    printer.close()
    _say(results_table(result.metrics))
    _say(f"wrote {out / 'metrics.json'}")
    return out


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Report:
    """What happened on the network: the ``flower`` section of ``metrics.json``."""

    def __init__(self, num_clients: int, connect_timeout: float, reply_timeout: float, min_replies: int):
        self.num_clients = num_clients
        self.connect_timeout, self.reply_timeout, self.min_replies = connect_timeout, reply_timeout, min_replies
        self.nodes: list[int] = []
        self.replied: list[dict[str, Any]] = []
        self.missing: list[dict[str, Any]] = []
        self.other_nodes: list[dict[str, Any]] = []  # nodes that are no client of this run (and why)
        self.seconds: dict[str, float] = {}  # wall-clock of: waiting for the nodes, the handshake, the round

    def missing_client(self, partition_id: int, node_id: int | None, reason: str, detail: str) -> None:
        self.missing.append({"client": partition_id, "node_id": node_id, "reason": reason, "detail": detail})

    def is_missing(self, partition_id: int) -> bool:
        return any(m["client"] == partition_id for m in self.missing)

    def summary(self) -> str:
        got = ", ".join(str(r["client"]) for r in sorted(self.replied, key=lambda r: r["client"])) or "none"
        text = f"clients replied: {got} ({len(self.replied)}/{self.num_clients})"
        for m in sorted(self.missing, key=lambda m: (m["client"] is None, m["client"] or 0)):
            text += f"; client {m['client']} missing ({m['reason']}: {m['detail']})"
        for o in self.other_nodes:
            text += f"; node {o['node_id']} left out ({o['reason']}: {o['detail']})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_clients": self.num_clients,
            "nodes": self.nodes,
            "replied": sorted(self.replied, key=lambda r: r["client"]),
            "missing": sorted(self.missing, key=lambda m: m["client"]),
            "other_nodes": self.other_nodes,
            "connect_timeout_s": self.connect_timeout,
            "reply_timeout_s": self.reply_timeout,
            "min_replies": self.min_replies,
            "seconds": self.seconds,
        }


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """The connected SuperNodes, once ``wanted`` of them are (or whatever is there at ``timeout``)."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        nodes = list(grid.get_node_ids())
    return nodes


def exchange(grid: Grid, messages: dict[int, Message], timeout: float
             ) -> tuple[dict[int, Message], dict[int, str]]:
    """Send one message per node and collect the replies for up to ``timeout`` seconds
    (Flower's ``Grid.send_and_receive``).

    Returns the replies by node id, and for every node without a reply why not.
    """
    replies = {reply.metadata.src_node_id: reply
               for reply in grid.send_and_receive(list(messages.values()), timeout=timeout)}
    lost = {node: f"no reply within {timeout:g} s" for node in messages if node not in replies}
    return replies, lost


def _error_text(reply: Message) -> str:
    return f"{reply.error.reason} (Flower error code {reply.error.code})"


def _message(content: RecordDict, node: int, message_type: str, timeout: float) -> Message:
    # The TTL outlives the wait, so a slow node's reply is not refused by the SuperLink first.
    return Message(content, dst_node_id=node, message_type=message_type, group_id=task.GROUP, ttl=timeout + 600)


def handshake(grid: Grid, nodes: Iterable[int], timeout: float, report: Report) -> dict[int, int]:
    """Ask every node which client it is; returns {partition-id: node id} of the usable ones."""
    messages = {n: _message(RecordDict(), n, task.QUERY, timeout) for n in nodes}
    replies, lost = exchange(grid, messages, timeout)
    assigned: dict[int, int] = {}
    for node in sorted(messages):
        if node in lost:
            report.other_nodes.append({"node_id": node, "reason": "handshake", "detail": lost[node]})
            continue
        reply = replies[node]
        if reply.has_error():
            report.other_nodes.append({"node_id": node, "reason": "handshake error", "detail": _error_text(reply)})
            continue
        record = reply.content[task.NODE]
        k, num = int(record["partition-id"]), int(record["num-partitions"])
        if not 0 <= k < report.num_clients:
            report.other_nodes.append({"node_id": node, "reason": "partition-id out of range",
                                       "detail": f"partition-id={k}, but the run has {report.num_clients} clients"})
        elif num not in (-1, report.num_clients):
            report.other_nodes.append({"node_id": node, "reason": "num-partitions differs",
                                       "detail": f"the node has num-partitions={num}, the run num-clients="
                                                 f"{report.num_clients}"})
        elif k in assigned:
            report.other_nodes.append({"node_id": node, "reason": "duplicate partition-id",
                                       "detail": f"node {assigned[k]} is already client {k}"})
        else:
            assigned[k] = node
    return assigned


def train_round(grid: Grid, assigned: dict[int, int], cfg, dataset, init, *, timeout: float, report: Report
                ) -> dict[int, tuple[Message, Any]]:
    """The one round: returns {partition-id: (reply, rebuilt model)} of the clients that replied."""
    from fedmitr.errors import excerpt

    content = RecordDict({
        task.CONFIG: ConfigRecord({"config": task.config_to_json(cfg)}),
        task.INIT: ArrayRecord.from_torch_state_dict(task.cpu_state(init)),
    })
    node_to_client = {node: k for k, node in assigned.items()}
    messages = {node: _message(content, node, task.TRAIN, timeout) for node in node_to_client}
    _say(f"one round: training clients {sorted(assigned)} on their nodes (waiting up to {timeout:g} s)")
    replies, lost = exchange(grid, messages, timeout) if messages else ({}, {})
    out: dict[int, tuple[Message, Any]] = {}
    for node, k in sorted(node_to_client.items(), key=lambda item: item[1]):
        if node in lost:
            report.missing_client(k, node, "timeout" if "no reply" in lost[node] else "not sent", lost[node])
            continue
        reply = replies[node]
        if reply.has_error():
            report.missing_client(k, node, "error", _error_text(reply))
            continue
        try:
            metrics = reply.content[task.METRICS]
            if int(metrics["partition-id"]) != k:
                raise ValueError(f"the reply is for client {metrics['partition-id']}, not {k}")
            model = _rebuild(cfg, dataset, reply.content[task.MODEL])
        except Exception as err:  # noqa: BLE001 - a malformed reply costs this client, not the run
            report.missing_client(k, node, "invalid reply", f"{type(err).__name__}: {excerpt(str(err), 200)}")
            continue
        out[k] = (reply, model)
        report.replied.append({"client": k, "node_id": node, "num_samples": int(metrics["num-samples"]),
                               "train_seconds": float(metrics["train-seconds"]),
                               "device": str(reply.content[task.INFO]["device"]) if task.INFO in reply.content else None})
    return out


def _rebuild(cfg, dataset, record: ArrayRecord):
    """The client's trained ViT from its weights (shapes must match the run's architecture)."""
    import dataclasses

    from fedmitr.models import build_model

    model = build_model(dataclasses.replace(cfg.model, pretrained=False), dataset.num_classes, dataset.channels,
                        dataset.image_size)
    model.load_state_dict(record.to_torch_state_dict())
    return model


def federation(cfg, dataset, replies: dict[int, tuple[Message, Any]], seconds: dict[str, float]):
    """A ``fedmitr.pipeline.Federation`` of the clients that replied (the server never sees their data)."""
    import numpy as np

    from fedmitr.clients import ClientResult
    from fedmitr.data import Partition
    from fedmitr.ensemble import Ensemble
    from fedmitr.pipeline import Federation
    from fedmitr.runtime import describe_device, make_accelerator

    accelerator = make_accelerator()
    clients, counts = [], []
    for k in sorted(replies):
        reply, model = replies[k]
        m = reply.content[task.METRICS]
        clients.append(ClientResult(k, model.to(accelerator.device).eval(), int(m["num-samples"]),
                                    seconds=float(m["train-seconds"]), losses=[float(v) for v in m["losses"]]))
        counts.append([int(c) for c in m["class-counts"]])
    accuracy = [Ensemble([c.model]).evaluate(dataset.test) for c in clients]
    # Only the class counts travel; the shards' sample indices stay on the nodes.
    part = Partition(tuple(np.zeros(0, dtype=np.int64) for _ in clients), np.array(counts, dtype=np.int64),
                     cfg.data.alpha)
    return Federation(dataset, part, clients, client_accuracy=accuracy, accelerator=accelerator,
                      device=describe_device(accelerator), seconds=seconds)
