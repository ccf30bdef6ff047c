"""The Flower app (examples/flower) in deployment, over loopback.

Each test starts a real SuperLink and real SuperNodes as separate processes on 127.0.0.1 (insecure
mode, free ports, FLWR_HOME in a temporary folder so nothing touches ~/.flwr, no runtime
dependency installation: there is no network), submits the app with ``flwr run``, checks the run
directory the ServerApp wrote, and stops every process it started (SuperLink, SuperNodes and what
they spawned: SuperExecs, the ServerApp, the ClientApps), first gently, then by force.

* three SuperNodes, one per client: the run directory of ``fedmitr run`` is written, and the
  clients are the very models ``fedmitr run`` trains;
* four SuperNodes, one raising in its ClientApp (node config ``fail=true``) and one too slow
  (``stall-seconds``): the run completes with the other two, and ``metrics.json`` names the
  missing clients and why.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import psutil  # noqa: E402 - a dependency of accelerate, so of fedmitr
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr: installed with flwr
CONNECTION = "fedmitr-test"  # the SuperLink connection's name in the temporary Flower config

sys.path.insert(0, str(APP))  # the app's shared module, for the config checks and the expected clients
try:
    from fedmitr_flower import client_app, server_app, task  # noqa: E402
finally:
    sys.path.remove(str(APP))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _toml(value) -> str:
    if isinstance(value, str):
        return "'" + value + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


class LocalFederation:
    """A SuperLink and SuperNodes as processes on 127.0.0.1, all stopped by :meth:`stop`."""

    def __init__(self, base: Path, node_configs: list[str]):
        self.base = base
        self.home = base / "flwr-home"  # FLWR_HOME: Flower config, installed apps; unique to this federation
        self.logs = base / "logs"
        self.work = base / "work"
        for d in (self.home, self.logs, self.work):
            d.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.node_configs = node_configs
        self.procs: list[subprocess.Popen] = []
        self._files = []
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperExec and the apps are found on PATH
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        }
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._files.append(log)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._wait_listening(self._spawn("superlink", [
            str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation"]))
        for i, node_config in enumerate(self.node_configs):
            # No --allow-runtime-dependency-installation: a SuperNode never runs `uv sync` then.
            self._spawn(f"supernode-{i}", [str(BIN / "flower-supernode"), "--insecure",
                                           "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
                                           "--port", str(_free_port()), "--node-config", node_config])

    def _wait_listening(self, link: subprocess.Popen) -> None:
        deadline = time.monotonic() + 60
        while True:
            assert link.poll() is None, f"the SuperLink exited:\n{_tail(self.logs / 'superlink.log')}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"the SuperLink did not listen:\n{self.tails()}"
                time.sleep(0.3)

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.work, capture_output=True,
                              text=True, timeout=timeout)

    def run(self, run_config: dict, timeout: float = 170) -> tuple[str, dict]:
        """``flwr run`` the app, streaming its logs until the run ends; the run's output and status."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        try:
            done = self.flwr("run", str(APP), CONNECTION, "--run-config", overrides, "--stream", timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"the run did not end within {timeout} s:\n{err.stdout}\n{self.tails()}") from None
        output = done.stdout + done.stderr
        found = re.search(r"Successfully started run (\d+)", output)
        assert done.returncode == 0 and found, f"flwr run failed:\n{output}\n{self.tails()}"
        listed = self.flwr("ls", CONNECTION, "--run-id", found.group(1), "--format", "json", timeout=60)
        status = json.loads(listed.stdout)["runs"][0]
        return output, status

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(self.logs.glob("*.log")))

    def ours(self) -> list[psutil.Process]:
        """Every live process this federation started: the ones spawned here and all their descendants,
        and any process (even one orphaned) whose environment has this federation's FLWR_HOME."""
        found: dict[int, psutil.Process] = {}
        for proc in self.procs:
            try:
                p = psutil.Process(proc.pid)
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter():
            try:
                if p.pid not in found and p.environ().get("FLWR_HOME") == str(self.home):
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return [p for p in found.values() if p.pid != os.getpid()]

    def stop(self) -> None:
        """Terminate every process of the federation, kill what is left after 10 s; check none is left."""
        try:
            for _ in range(3):  # a process may spawn another while the first ones stop
                procs = self.ours()
                if not procs:
                    break
                for p in procs:
                    try:
                        p.terminate()
                    except psutil.NoSuchProcess:
                        pass
                _, alive = psutil.wait_procs(procs, timeout=10)
                for p in alive:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                psutil.wait_procs(alive, timeout=5)
            for proc in self.procs:  # reap our direct children
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for f in self._files:
                f.close()
        left = []
        for p in self.ours():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {' '.join(p.cmdline())}")
            except psutil.NoSuchProcess:
                pass
        assert not left, f"processes left running: {left}"


class ReadmeFederation(LocalFederation):
    """The README's steps, literally: ``examples/flower/federation.sh superlink``, ``supernode k n``,
    ``connect``, ``run``, with the PATH a user has (the venv's bin not on it, nothing activated)."""

    SCRIPT = APP / "federation.sh"

    def __init__(self, base: Path, node_configs: list[str]):
        super().__init__(base, node_configs)
        user_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                    if Path(p).resolve() != BIN.resolve())
        self.env = {**self.env, "PATH": user_path, "FEDMITR_FLOWER_PORT": str(self.port),
                    "FEDMITR_VENV": str(BIN.parent)}
        self.env.pop("PYTHONPATH")
        (self.home / "config.toml").unlink()  # the connection comes from the README's `connect` step

    def start(self) -> None:
        self._wait_listening(self._spawn("superlink", ["bash", str(self.SCRIPT), "superlink"]))
        for k, _ in enumerate(self.node_configs):
            self._spawn(f"supernode-{k}", ["bash", str(self.SCRIPT), "supernode", str(k), str(len(self.node_configs))])
        done = subprocess.run(["bash", str(self.SCRIPT), "connect"], env=self.env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and "flwr connection 'fedmitr'" in done.stdout, done.stdout + done.stderr

    def run(self, run_config: dict, timeout: float = 170) -> tuple[str, dict]:
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        try:
            done = subprocess.run(["bash", str(self.SCRIPT), "run", overrides], env=self.env, cwd=self.work,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"the run did not end within {timeout} s:\n{err.stdout}\n{self.tails()}") from None
        output = done.stdout + done.stderr
        found = re.search(r"Successfully started run (\d+)", output)
        assert done.returncode == 0 and found, f"flwr run failed:\n{output}\n{self.tails()}"
        listed = self.flwr("ls", "fedmitr", "--run-id", found.group(1), "--format", "json", timeout=60)
        return output, json.loads(listed.stdout)["runs"][0]


@pytest.fixture
def federation(tmp_path):
    """Start a federation with ``start(node_configs, kind)``; every one is stopped at the end of the test."""
    started: list[LocalFederation] = []

    def start(node_configs: list[str], kind: type[LocalFederation] = LocalFederation) -> LocalFederation:
        fed = kind(tmp_path / f"federation-{len(started)}", node_configs)
        started.append(fed)
        fed.start()
        return fed

    try:
        yield start
    finally:
        errors = []
        for fed in started:
            try:
                fed.stop()
            except Exception as err:  # noqa: BLE001 - stop the others, then report
                errors.append(err)
        if errors:
            raise errors[0]


def _metrics(out: Path, output: str, fed: LocalFederation) -> dict:
    assert (out / "metrics.json").exists(), f"no metrics.json in {out}:\n{output}\n{fed.tails()}"
    return json.loads((out / "metrics.json").read_text())


def test_the_readme_steps_train_the_clients_of_fedmitr_run(federation, tmp_path):
    """examples/flower/README.md, followed literally: three SuperNodes train the clients of `fedmitr run`."""
    fed = federation([f"partition-id={k} num-partitions=3" for k in range(3)], ReadmeFederation)
    out = tmp_path / "run"
    output, status = fed.run({"preset": "tiny", "num-clients": 3, "alpha": 0.5, "seed": 0,
                              "methods": "fedavg,ensemble,fedmitr", "out-dir": str(out),
                              "connect-timeout": 90.0, "reply-timeout": 150.0})
    assert status["status"] == "finished:completed", f"{status}\n{output}\n{fed.tails()}"
    metrics = _metrics(out, output, fed)

    # The run directory of `fedmitr run`.
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "tiny" and config["data"]["num_clients"] == 3 and config["seed"] == 0
    assert set(metrics["methods"]) == {"fedavg", "ensemble", "fedmitr"}
    assert all(0 <= m["accuracy"] <= 1 for m in metrics["methods"].values())
    assert len(metrics["methods"]["fedmitr"]["curve"]) == config["distill"]["rounds"]
    assert {p.name for p in (out / "models").glob("*.safetensors")} == {"fedavg.safetensors", "fedmitr.safetensors",
                                                                     "fedmitr.aux.safetensors"}
    assert (out / "synthetic" / "fedmitr.safetensors").exists()
    assert [c["index"] for c in metrics["clients"]] == [0, 1, 2]
    assert metrics["partition"]["alpha"] == 0.5 and len(metrics["partition"]["class_counts"]) == 3

    # Who replied, from which node.
    flower = metrics["flower"]
    assert [r["client"] for r in flower["replied"]] == [0, 1, 2] and flower["missing"] == []
    assert len(set(flower["nodes"])) == 3 and {r["node_id"] for r in flower["replied"]} == set(flower["nodes"])
    assert flower["min_replies"] == 2 and flower["reply_timeout_s"] == 150.0

    # The clients trained on their nodes are the clients of `fedmitr run` with the same config.
    from fedmitr.pipeline import prepare, train

    cfg = task.config_from_json((out / "config.json").read_text())
    local = train(cfg)
    part = prepare(cfg).partition
    for client, entry in zip(local.clients, metrics["clients"]):
        remote = load_file(str(out / "clients" / f"client_{client.index}.safetensors"))
        for name, value in client.model.state_dict().items():
            torch.testing.assert_close(remote[name], value.cpu(), rtol=0, atol=1e-5, msg=name)
        assert entry["num_samples"] == client.num_samples
    assert metrics["partition"]["class_counts"] == part.class_counts.tolist()


def test_a_crashing_and_a_silent_client_are_left_out_and_reported(federation, tmp_path):
    fed = federation(["partition-id=0 num-partitions=4",
                      "partition-id=1 num-partitions=4 fail=true",  # raises in its ClientApp
                      "partition-id=2 num-partitions=4",
                      "partition-id=3 num-partitions=4 stall-seconds=600.0"])  # never answers in time
    out = tmp_path / "run"
    output, status = fed.run({"preset": "tiny", "num-clients": 4, "methods": "fedavg,ensemble", "out-dir": str(out),
                              "connect-timeout": 90.0, "reply-timeout": 50.0, "min-replies": 2})
    assert status["status"] == "finished:completed", f"{status}\n{output}\n{fed.tails()}"
    metrics = _metrics(out, output, fed)

    flower = metrics["flower"]
    assert [r["client"] for r in flower["replied"]] == [0, 2]
    missing = {m["client"]: m for m in flower["missing"]}
    assert set(missing) == {1, 3}, flower
    assert missing[1]["reason"] == "error" and "fails on purpose" in missing[1]["detail"]
    assert missing[3]["reason"] == "timeout" and "no reply within 50 s" in missing[3]["detail"]
    assert all(m["node_id"] in flower["nodes"] for m in missing.values())
    # The methods ran on the two clients that replied.
    assert [c["index"] for c in metrics["clients"]] == [0, 2]
    assert set(metrics["methods"]) == {"fedavg", "ensemble"}
    assert sorted(p.name for p in (out / "clients").glob("*.safetensors")) == ["client_0.safetensors",
                                                                              "client_2.safetensors"]
    assert "client 1 missing (error" in output and "client 3 missing (timeout" in output


def test_run_and_node_config_are_checked():
    from fedmitr.errors import ConfigError

    cfg = task.config_from_run_config({"preset": "tiny", "num-clients": 4, "alpha": "iid", "seed": 3,
                                       "methods": "fedavg", "epochs": 2, "out-dir": ""})
    assert (cfg.data.num_clients, cfg.data.alpha, cfg.seed, cfg.methods, cfg.clients.epochs) == (4, None, 3,
                                                                                               ("fedavg",), 2)
    assert task.config_from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown run config key"):
        task.config_from_run_config({"num-client": 3})
    with pytest.raises(ConfigError, match=r"clients must be a whole number >= 2 \(got 2.5\)"):
        task.config_from_run_config({"num-clients": 2.5})
    settings = task.run_settings({"out-dir": "", "reply-timeout": 30, "min-replies": 4}, cfg)
    assert (settings.out_dir, settings.connect_timeout, settings.reply_timeout, settings.min_replies) == ("", 120.0,
                                                                                                         30.0, 4)
    with pytest.raises(ConfigError, match="min-replies must be between 1 and num-clients=4"):
        task.run_settings({"min-replies": 5}, cfg)
    with pytest.raises(ConfigError, match="reply-timeout must be a number of seconds > 0"):
        task.run_settings({"reply-timeout": 0}, cfg)

    node = task.node_settings({"partition-id": 2, "num-partitions": 3, "fail": True})
    assert (node.partition_id, node.num_partitions, node.fail, node.stall_seconds) == (2, 3, True, 0.0)
    with pytest.raises(ValueError, match="no partition-id"):
        task.node_settings({})
    with pytest.raises(ValueError, match="num-partitions must be an integer > partition-id"):
        task.node_settings({"partition-id": 3, "num-partitions": 3})


class InProcessGrid:
    """A stand-in for the SuperLink: every node's ClientApp runs in this process, on its node config.

    A ClientApp that raises is answered with an error reply, as a SuperNode answers; nodes in
    ``silent`` never answer ``train``.
    """

    def __init__(self, node_configs: dict[int, dict], silent: set[int] = frozenset()):
        self.node_configs, self.silent = node_configs, silent
        self.inbox: dict[str, object] = {}

    def get_node_ids(self):
        return list(self.node_configs)

    def push_messages(self, messages):
        import uuid

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as flwr's InMemoryGrid does
            self.inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Context, Error, Message, RecordDict

        replies = []
        for message_id in message_ids:
            msg = self.inbox.pop(message_id, None)
            node = None if msg is None else msg.metadata.dst_node_id
            if msg is None or (node in self.silent and msg.metadata.message_type == task.TRAIN):
                continue
            context = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(),
                              run_config={})
            try:
                replies.append(client_app.app(message=msg, context=context))
            except Exception as err:  # noqa: BLE001 - what a SuperNode does with a raising ClientApp
                replies.append(Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=msg))
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        """What flwr's grids do: push, then pull the replies (here they are there at once; a silent
        node's never come, whatever the timeout)."""
        return self.pull_messages(self.push_messages(messages))


def test_server_leaves_out_bad_nodes_and_needs_min_replies(tmp_path, monkeypatch):
    """The ServerApp's bookkeeping, against in-process nodes: duplicate and out-of-range partition ids,
    a raising and a silent client, and too few replies."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(server_app, "POLL_SECONDS", 0.05)
    for name in ("_task_id", "_run_id", "_node_id"):  # what flwr-serverapp sets before a ServerApp runs
        monkeypatch.setattr(TaskIdentity, name, 1)
    nodes = {11: {"partition-id": 0}, 12: {"partition-id": 0}, 13: {"partition-id": 7},
             14: {"partition-id": 1, "num-partitions": 3}, 15: {"partition-id": 2, "fail": True}}
    run_config = {"preset": "tiny", "num-clients": 3, "methods": "fedavg,ensemble", "reply-timeout": 1.0,
                  "min-replies": 1}

    out = server_app.run(InProcessGrid(nodes, silent={14}), {**run_config, "out-dir": str(tmp_path / "a")})
    flower = json.loads((out / "metrics.json").read_text())["flower"]
    assert [(r["client"], r["node_id"]) for r in flower["replied"]] == [(0, 11)]
    assert [(m["client"], m["node_id"], m["reason"]) for m in flower["missing"]] == [(1, 14, "timeout"),
                                                                                   (2, 15, "error")]
    assert {o["node_id"]: o["reason"] for o in flower["other_nodes"]} == {12: "duplicate partition-id",
                                                                        13: "partition-id out of range"}

    with pytest.raises(RuntimeError, match=r"only 1 of 3 clients replied, fewer than min-replies=2.*client 2 missing"):
        server_app.run(InProcessGrid(nodes, silent={14}), {**run_config, "min-replies": 2,
                                                            "out-dir": str(tmp_path / "b")})
    assert not (tmp_path / "b" / "metrics.json").exists()
