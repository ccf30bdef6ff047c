"""The ClientApp: one fedmitr client on one SuperNode.

The node's ``--node-config`` says which client it is (``partition-id``, optionally
``num-partitions``); ``fail=true`` makes it raise instead of training and ``stall-seconds=S`` makes
it wait S seconds first (both for testing how the server copes with a lost client).
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedmitr_flower import task

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The handshake: which client this node is."""
    node = task.node_settings(context.node_config)
    record = ConfigRecord({"partition-id": node.partition_id,
                           "num-partitions": -1 if node.num_partitions is None else node.num_partitions})
    return Message(RecordDict({task.NODE: record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The one round: train this node's client once from the server's initial weights."""
    node = task.node_settings(context.node_config)
    if node.fail:
        raise RuntimeError(f"client {node.partition_id} fails on purpose (node config fail=true)")
    if node.stall_seconds:
        log(INFO, "client %d: stalling %.0f s (node config stall-seconds)", node.partition_id, node.stall_seconds)
        time.sleep(node.stall_seconds)

    cfg = task.config_from_json(str(msg.content[task.CONFIG]["config"]))
    k = cfg.data.num_clients
    if node.num_partitions is not None and node.num_partitions != k:
        raise ValueError(f"this node was started with num-partitions={node.num_partitions}, "
                         f"but the run splits the data over num-clients={k}")
    import torch  # noqa: F401 - ArrayRecord's torch conversion needs torch loaded (it looks in sys.modules)

    init_state = msg.content[task.INIT].to_torch_state_dict()
    result, class_counts, device = task.train_shard(cfg, node.partition_id, init_state)
    log(INFO, "client %d/%d: trained on %d samples in %.1f s on %s, final loss %.4f", node.partition_id, k,
        result.num_samples, result.seconds, device, result.losses[-1] if result.losses else float("nan"))

    metrics = MetricRecord({
        "partition-id": node.partition_id,
        "num-samples": result.num_samples,
        "train-seconds": result.seconds,
        "class-counts": [int(c) for c in class_counts],
        "losses": [float(v) for v in result.losses],
    })
    model = ArrayRecord.from_torch_state_dict(task.cpu_state(result.model))
    info = ConfigRecord({"device": device})
    return Message(RecordDict({task.MODEL: model, task.METRICS: metrics, task.INFO: info}), reply_to=msg)
