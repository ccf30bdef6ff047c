"""What the ServerApp and the ClientApps share: the run config, the node config and the messages.

One run, two exchanges (each a Flower message to every SuperNode and its reply):

1. ``query`` (a handshake, no data): each node answers with its ``partition-id``, so the server
   knows which client every node is, even for a node that crashes later.
2. ``train`` (the one round of one-shot FL): the server sends the effective fedmitr config and the
   shared initial weights; the node trains its client ViT once on its own shard, exactly as client
   ``partition-id`` of ``fedmitr run`` would, and replies with the weights, its class counts, its
   sample count and its training time.

fedmitr and torch are imported inside the functions, so that answering the handshake does not
load them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fedmitr.clients import ClientResult
    from fedmitr.config import RunConfig

# Message types (flwr.app.MessageType.QUERY / TRAIN) and group id of a run's messages.
QUERY, TRAIN = "query", "train"
GROUP = "fedmitr-one-shot"

# Record names in the messages' RecordDicts.
CONFIG = "fedmitr"  # ConfigRecord: {"config": the RunConfig as JSON} (server -> client, train)
INIT = "init"  # ArrayRecord: the initial weights every client starts from (server -> client, train)
NODE = "node"  # ConfigRecord: {"partition-id", "num-partitions"} (client -> server, query)
MODEL = "model"  # ArrayRecord: the trained client weights (client -> server, train)
METRICS = "metrics"  # MetricRecord: partition-id, num-samples, train-seconds, class-counts, losses
INFO = "info"  # ConfigRecord: {"device": where the client trained} (client -> server, train)


# --- run config (pyproject.toml [tool.flwr.app.config], `flwr run --run-config`) ------------------

NETWORK_KEYS = ("out-dir", "connect-timeout", "reply-timeout", "min-replies")  # see RunSettings


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The fedmitr config of a Flower run: the preset, then the run config's knobs, parsed by the
    library exactly as ``fedmitr run`` parses its flags (:mod:`fedmitr.knobs`); validated.

    A knob's key is its name (``num-clients`` for ``clients``); ``epochs = 0`` keeps the preset's.
    Raises ``fedmitr.errors.ConfigError`` (one clear line) for a bad value.
    """
    from fedmitr.errors import ConfigError
    from fedmitr.knobs import KNOBS, config_from_knobs

    by_key = {knob.flower or name: name for name, knob in KNOBS.items()}
    unknown = sorted(set(run_config) - set(by_key) - set(NETWORK_KEYS))
    if unknown:
        raise ConfigError(f"unknown run config key(s) {', '.join(unknown)}; known: "
                          f"{', '.join([*by_key, *NETWORK_KEYS])}")
    values = {by_key[key]: value for key, value in run_config.items() if key in by_key}
    if values.get("epochs") == 0:  # the pyproject's placeholder: the preset's epochs
        del values["epochs"]
    return config_from_knobs(values)


@dataclass(frozen=True)
class RunSettings:
    """The run config's keys about the network and the output, not about fedmitr itself."""

    out_dir: str  # "" = the default run directory
    connect_timeout: float  # seconds to wait for num-clients SuperNodes
    reply_timeout: float  # seconds to wait for the trained weights
    min_replies: int  # fewer replies and the run fails


def run_settings(run_config: Mapping[str, Any], cfg: RunConfig) -> RunSettings:
    """Read and check the network and output keys of the run config (``cfg``: its fedmitr config)."""
    from fedmitr.errors import ConfigError

    min_replies = _int("min-replies", run_config.get("min-replies", 2))
    if not 1 <= min_replies <= cfg.data.num_clients:
        raise ConfigError(f"min-replies must be between 1 and num-clients={cfg.data.num_clients} (got {min_replies})")
    return RunSettings(str(run_config.get("out-dir", "") or ""), _seconds(run_config, "connect-timeout", 120.0),
                       _seconds(run_config, "reply-timeout", 1800.0), min_replies)


def _seconds(run_config: Mapping[str, Any], key: str, default: float) -> float:
    from fedmitr.errors import ConfigError

    value = run_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"{key} must be a number of seconds > 0 (got {value!r})")
    return float(value)


def _int(key: str, value: Any) -> int:
    from fedmitr.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be an integer (got {value!r})")
    try:
        out = int(value)
    except ValueError:
        raise ConfigError(f"{key} must be an integer (got {value!r})") from None
    if out != float(value):
        raise ConfigError(f"{key} must be an integer (got {value!r})")
    return out


def config_to_json(cfg: RunConfig) -> str:
    return cfg.to_json()


def config_from_json(text: str) -> RunConfig:
    """The server's effective config, as sent in the ``train`` message."""
    from fedmitr.config import apply_overrides, preset_config
    from fedmitr.methods import check_config

    fields = json.loads(text)
    return check_config(apply_overrides(preset_config(fields["preset"]), fields))


# --- node config (`flower-supernode --node-config "partition-id=0 num-partitions=3"`) --------------

@dataclass(frozen=True)
class NodeSettings:
    partition_id: int  # which client of the split this node is (0-based)
    num_partitions: int | None  # if set, must equal the run's num-clients
    fail: bool = False  # raise in the ClientApp instead of training (to test a crashing client)
    stall_seconds: float = 0.0  # sleep this long before training (to test the reply timeout)


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Read the SuperNode's ``--node-config``; raise ValueError naming what is wrong."""
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode has no partition-id: start it with "
                         "--node-config \"partition-id=K num-partitions=N\" (K in 0..N-1)")
    pid = node_config["partition-id"]
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ValueError(f"node config partition-id must be an integer >= 0 (got {pid!r})")
    num = node_config.get("num-partitions")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num <= pid):
        raise ValueError(f"node config num-partitions must be an integer > partition-id (got {num!r})")
    fail = node_config.get("fail", False)
    if isinstance(fail, str):
        fail = fail.strip().lower() in ("1", "true", "yes")
    stall = node_config.get("stall-seconds", 0.0)
    if isinstance(stall, bool) or not isinstance(stall, (int, float)) or stall < 0:
        raise ValueError(f"node config stall-seconds must be a number >= 0 (got {stall!r})")
    return NodeSettings(pid, num, bool(fail), float(stall))


# --- the client's work ------------------------------------------------------------------------------

def load_shard(cfg: RunConfig, partition_id: int):
    """The dataset and the split of ``fedmitr run`` (see ``fedmitr.pipeline.prepare``).

    Every node computes the same deterministic Dirichlet split of the bundled data and keeps its
    own shard: a stand-in for data that lives on the node.
    """
    from fedmitr.errors import ConfigError
    from fedmitr.pipeline import load_data

    d = cfg.data
    if not 0 <= partition_id < d.num_clients:
        raise ConfigError(f"this node's partition-id {partition_id} is outside 0..{d.num_clients - 1} "
                          f"(the run has num-clients={d.num_clients})")
    return load_data(cfg)


def train_shard(cfg: RunConfig, partition_id: int, init_state: Mapping[str, torch.Tensor]
                ) -> tuple[ClientResult, np.ndarray, str]:
    """Train client ``partition_id`` once, as ``fedmitr.clients.train_clients`` trains it.

    Returns the result, the shard's class counts ``[C]`` and the device it trained on.
    """
    from fedmitr.clients import train_one
    from fedmitr.runtime import describe_device, make_accelerator

    dataset, part = load_shard(cfg, partition_id)
    accelerator = make_accelerator()
    # The weights come from the server, so a pretrained architecture needs no download here.
    model_cfg = dataclasses.replace(cfg.model, pretrained=False)
    result = train_one(partition_id, dataset, part, model_cfg, cfg.clients, accelerator=accelerator, seed=cfg.seed,
                       init_state=dict(init_state))
    return result, part.class_counts[partition_id], str(describe_device(accelerator))


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
