"""Fault-tolerant outer sync (torchft): replica groups of one `minerd run` each and a real
lighthouse on localhost. A replica killed with SIGKILL does not stop the others; restarted,
it takes the group's current state from a live peer; a replica whose training config
differs is refused; a lighthouse that is not up yet is waited for, not crash-looped on."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from daemon.checkpoint import CheckpointStore
from daemon.logsetup import json_records
from tests.conftest import ROOT, MinerProcess, free_port, get_json, task_sets

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def lighthouse_bin() -> str:
    found = shutil.which("torchft_lighthouse") or str(Path(sys.executable).parent / "torchft_lighthouse")
    if not Path(found).exists():
        pytest.fail("torchft_lighthouse is missing: make setup installs the ft extra")
    return found


def start_lighthouse(port: int, min_replicas: int, log: Path) -> subprocess.Popen[bytes]:
    # Short timeouts: a dead replica is left out of the quorum a second after its last heartbeat.
    return subprocess.Popen([lighthouse_bin(), "--bind", f"127.0.0.1:{port}", "--min_replicas", str(min_replicas),
                             "--join_timeout_ms", "1000", "--heartbeat_timeout_ms", "1000"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


TOKEN = b"the group's shared secret, 42 bytes long."


def token_file(folder: Path, content: bytes = TOKEN) -> Path:
    path = folder / ("ft.token" if content == TOKEN else f"ft-{hashlib.sha256(content).hexdigest()[:8]}.token")
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return path


def replica_sets(state: Path, lighthouse: int, group: int, *extra: str, task: str = "twotower") -> list[str]:
    return task_sets(task, state, "ft.enabled=true", f"ft.lighthouse=http://127.0.0.1:{lighthouse}",
                      f"ft.token_file={token_file(state.parent)}",
                      "ft.host=127.0.0.1", f"ft.replica_group={group}", "ft.min_replicas=2",
                      "ft.quorum_timeout_seconds=5", "ft.timeout_seconds=5", "ft.connect_timeout_seconds=2",
                      "train.inner_steps_per_outer=5", "train.max_steps=1000000", "telemetry.param_digest=true",
                      "checkpoint.every_inner_steps=10", f"api.port={free_port()}", *extra)




def committed(m: MinerProcess) -> list[dict]:
    return [e for e in m.events() if e.get("event") == "outer step applied" and e.get("committed")]


def wait_until(cond, timeout: float, what: str, *ms: MinerProcess | TorchrunGroup) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        for m in ms:
            if m.proc.poll() is not None:
                raise AssertionError(f"a replica exited ({m.proc.returncode}) before {what}:\n{m.text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n---\n".join(m.text()[-2000:] for m in ms))


def digests(ms: list[MinerProcess]) -> dict[int, dict[int, str]]:
    """global step -> replica index -> parameter digest."""
    out: dict[int, dict[int, str]] = defaultdict(dict)
    for i, m in enumerate(ms):
        for e in m.events():
            if "param_digest" in e:
                out[e["global_step"]][i] = e["param_digest"]
    return out




class TestReplicaGroups:
    def test_kill_restart_rejoin_and_alone(self, tmp_path: Path, miner_factory) -> None:
        port = free_port()
        lighthouse = start_lighthouse(port, 2, tmp_path / "lighthouse.log")
        try:
            states = [tmp_path / f"r{i}" for i in range(3)]
            reps = [miner_factory(states[i], replica_sets(states[i], port, i)) for i in range(3)]
            wait_until(lambda: all(any(e.get("participants") == 3 for e in committed(m)) for m in reps), 120,
                       "three replicas in one outer step", *reps)
            # 1. Kill one at the start of an outer sync.
            victim = reps[2]
            seen = len(committed(victim))
            wait_until(lambda: len(committed(victim)) > seen, 30, "the victim's next outer step", victim)
            victim.kill()
            killed_at = time.monotonic()
            survivors = reps[:2]
            base = [len(committed(m)) for m in survivors]
            wait_until(lambda: all(sum(e.get("participants") == 2 for e in committed(m)[b:]) >= 3
                                   for m, b in zip(survivors, base, strict=True)),
                       60, "three outer steps of the two survivors", *survivors)
            outage = time.monotonic() - killed_at
            for m in survivors:
                assert m.proc.poll() is None  # the same processes: no restart
                assert sum(e.get("event") == "FT CONNECTED: lighthouse reached" for e in m.events()) == 1
            # 2. Restart it: it takes the group's state from a live peer, then agrees with it.
            restarted = miner_factory(states[2], replica_sets(states[2], port, 2))
            t_restart = time.monotonic()
            wait_until(lambda: any(str(e.get("event", "")).startswith("FT JOINED") for e in restarted.events()),
                       90, "the restarted replica joining", restarted, *survivors)
            rejoin_seconds = time.monotonic() - t_restart
            joined = next(e for e in restarted.events() if str(e.get("event", "")).startswith("FT RECOVERED"))
            group = [*survivors, restarted]

            def equal_after_join() -> bool:
                table = digests(group)
                return any(len(v) == 3 and len(set(v.values())) == 1 and step > joined["global_step"]
                           for step, v in table.items())

            wait_until(equal_after_join, 60, "equal parameters on all three after the rejoin", *group)
            first_equal = min(s for s, v in digests(group).items()
                              if len(v) == 3 and len(set(v.values())) == 1 and s > joined["global_step"])
            assert first_equal <= joined["global_step"] + 5  # within one outer step (5 inner steps)
            print(f"FT: outage {outage:.1f}s for 3 steps, rejoin {rejoin_seconds:.1f}s")
            # Checkpoints go on after a recovery: the restarted replica's next one holds the group's step.
            wait_until(lambda: any(e.get("event") == "checkpoint saved" and e["global_step"] > joined["global_step"]
                                   for e in restarted.events()), 60, "a checkpoint after the recovery", restarted)
            # 3. Alone, under ft.min_replicas: the outer sync fails after the quorum timeout, the
            # round's progress is kept, training goes on; no exit, no hang.
            for m in group[1:]:
                m.kill()
            last = group[0]
            wait_until(lambda: "OUTER SYNC FAILED" in last.text(), 60, "a failed outer sync when alone", last)
            failed_at = max(e["global_step"] for e in last.events() if "global_step" in e)
            wait_until(lambda: max(e["global_step"] for e in last.events() if "global_step" in e) > failed_at + 5,
                       60, "training going on alone", last)
            last.signal(2)
            assert last.wait(60) == 0, last.text()[-3000:]
            assert "unrecoverable error" not in last.text()
        finally:
            stop(lighthouse)


class TestLighthouseDown:
    def test_waits_not_ready_then_trains_then_refuses_groups_of_another_config(self, tmp_path: Path,
                                                                              miner_factory) -> None:
        port, api = free_port(), free_port()
        state = tmp_path / "r0"
        # Another model than the two groups that join it later.
        sets = replica_sets(state, port, 5, "ft.min_replicas=1", "twotower.hidden_dim=48")
        sets = [s for s in sets if not s.startswith("api.port=")] + [f"api.port={api}"]
        m = miner_factory(state, sets)
        url = f"http://127.0.0.1:{api}"
        m.wait_for("FT WAITING", 90)
        code, body = get_json(f"{url}/readyz")
        assert code == 503 and "waiting for the lighthouse" in body.get("reason", ""), body
        assert get_json(f"{url}/livez")[0] == 200  # waiting is not a stall
        time.sleep(3)
        assert m.proc.poll() is None and m.text().count("FT WAITING") == 1  # one line, no crash loop
        assert get_json(f"{url}/status")[1]["ft"]["phase"] == "waiting_for_lighthouse"
        lighthouse = start_lighthouse(port, 1, tmp_path / "lighthouse.log")
        try:
            wait_until(lambda: get_json(f"{url}/readyz")[0] == 200, 60, "ready once the lighthouse is up", m)
            wait_until(lambda: len(committed(m)) >= 2, 60, "outer steps through the lighthouse", m)
            ft = get_json(f"{url}/status")[1]["ft"]
            assert ft["phase"] == "training" and ft["participants"] == 1 and ft["outer_syncs_committed"] >= 2
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            assert "minerd_ft_participants 1.0" in body and 'minerd_ft_outer_syncs_total{result="committed"}' in body
            # Two groups of another config join, outnumbering it. Nobody leaves: each side refuses the
            # other's updates and state, says so once, and trains on alone.
            pair = [miner_factory(tmp_path / f"p{i}", replica_sets(tmp_path / f"p{i}", port, i, "ft.min_replicas=1"))
                    for i in range(2)]

            def refusing(x: MinerProcess) -> list[dict]:
                return [e for e in x.events() if str(e.get("event", "")).startswith(
                    "FT REFUSED: replica groups of another training config are in the quorum")]

            wait_until(lambda: refusing(m) and all(refusing(p) for p in pair), 90, "each side refusing the other",
                       m, *pair)
            step = get_json(f"{url}/status")[1]["global_step"]
            wait_until(lambda: get_json(f"{url}/status")[1]["global_step"] > step + 10, 60, "training on alone", m)
            assert len(refusing(m)) == 1 and m.proc.poll() is None, m.text()[-3000:]
            assert get_json(f"{url}/status")[1]["ft"]["phase"] == "refusing_peers"
            assert "Traceback" not in m.text() and "refused to join" not in m.text()
            # Its operator stops it: the pair trains together, never having taken its state.
            asked = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the log's own format
            m.signal(signal.SIGINT)
            assert m.wait(60) == 0, m.text()[-3000:]
            wait_until(lambda: all(any(e.get("participants") == 2 for e in committed(p)) for p in pair), 90,
                       "the two groups training together without it", *pair)
            # A pair member behind the other may recover from it (a quorum that formed without the
            # other config, when it was slow to join one, or once it is gone), never from the other
            # config: every state it took is its mate's, never ahead of what its mate had reached
            # (the other config's, far ahead, is refused by its digest).
            for p, mate in ((pair[0], pair[1]), (pair[1], pair[0])):
                for e in p.events():
                    if not str(e.get("event", "")).startswith("FT RECOVERED") or e["timestamp"] > asked:
                        continue
                    reached = max((x["global_step"] for x in mate.events() if "global_step" in x
                                   and x["timestamp"] <= e["timestamp"]), default=0)
                    assert e.get("global_step", 0) <= reached, (e, reached)
                assert p.proc.poll() is None
        finally:
            stop(lighthouse)


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on (its threads included)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[3]
            host, _, port = local.rpartition(":")
            found.append((host.strip("[]"), int(port)))
    return found


class TestWhereItListens:
    """With ft.host and ft.ports, what the miner opens for its peers is there and nowhere else."""

    def test_host_and_port_range(self, tmp_path: Path, miner_factory) -> None:
        port, api = free_port(), free_port()
        first = free_port()
        ports = range(first + 1, first + 6) if first + 6 < 65535 else range(first - 6, first - 1)
        lighthouse = start_lighthouse(port, 1, tmp_path / "lighthouse.log")
        try:
            sets = [s for s in replica_sets(tmp_path / "r", port, 0, "ft.min_replicas=1")
                    if not s.startswith("api.port=")] + [f"api.port={api}", f"ft.ports={ports.start}-{ports.stop - 1}"]
            m = miner_factory(tmp_path / "r", sets)
            wait_until(lambda: len(committed(m)) >= 2, 90, "outer steps", m)
            socks = [s for s in listening(m.proc.pid) if s[1] != api]
            assert all(host == "127.0.0.1" for host, _ in socks), socks
            # The state server, the group's store and the manager server in the range; gloo's own
            # listener (the all-reduce between groups) takes a port torch does not let one choose.
            inside = [p for _, p in socks if p in ports]
            assert len(inside) == 3 and len(socks) - len(inside) <= 1, socks
        finally:
            stop(lighthouse)


class TestHostilePeers:
    """Peers with the honest group's config that send poison, or lack its token."""

    def test_a_peer_sending_nan_is_never_committed_nor_saved(self, tmp_path: Path, miner_factory) -> None:
        port = free_port()
        lighthouse = start_lighthouse(port, 2, tmp_path / "lighthouse.log")
        try:
            honest = miner_factory(tmp_path / "h", replica_sets(tmp_path / "h", port, 0))
            rogue = miner_factory(tmp_path / "r", replica_sets(tmp_path / "r", port, 1),
                                  module="tests.scripts.nan_replica")

            def failed(x: MinerProcess) -> list[dict]:
                return [e for e in x.events() if e.get("event", "").startswith("FT: outer sync attempt failed")
                        and "not finite" in str(e.get("error"))]

            wait_until(lambda: len(failed(honest)) >= 3, 120, "three outer syncs voted down", honest, rogue)
            wait_until(lambda: any(e.get("event") == "checkpoint saved" and e["global_step"] >= 20
                                   for e in honest.events()), 60, "checkpoints after the poison", honest, rogue)
            assert committed(honest) == []
            assert not any("TRAINING DIVERGED" in str(e.get("event")) or "restored the last good" in
                           str(e.get("event")) for e in honest.events())
            store = CheckpointStore(tmp_path / "h" / "checkpoints", keep=3)
            for path in store.checkpoints():
                ck = store.load(path)
                assert all(bool(torch.isfinite(t).all()) for t in ck.model.values()), path
        finally:
            stop(lighthouse)

    def test_a_peers_pickle_is_never_run(self, tmp_path: Path, miner_factory) -> None:
        """A replica group ahead of this one serves its state as torchft would by itself, a pickle
        whose unpickling writes a file: the recovering miner refuses it unread and trains on."""
        port = free_port()
        marker = tmp_path / "ran"
        lighthouse = start_lighthouse(port, 1, tmp_path / "lighthouse.log")
        try:
            rogue = miner_factory(tmp_path / "r", replica_sets(tmp_path / "r", port, 1, "ft.min_replicas=1"),
                                  env={"PICKLE_REPLICA_MARKER": str(marker)}, module="tests.scripts.pickle_replica")
            wait_until(lambda: len(committed(rogue)) >= 3, 90, "the hostile group ahead", rogue)
            honest = miner_factory(tmp_path / "h", replica_sets(tmp_path / "h", port, 0, "ft.min_replicas=1"))

            def refused(e: dict) -> bool:
                return "not minerd's" in str(e.get("error", "")) + str(e.get("exception", ""))

            wait_until(lambda: any(refused(e) for e in honest.events()), 120,
                       "the honest miner refusing the pickle", honest, rogue)
            step = max((e["global_step"] for e in honest.events() if "global_step" in e), default=0)
            wait_until(lambda: max((e["global_step"] for e in honest.events() if "global_step" in e), default=0)
                       > step + 5, 60, "the honest miner training on", honest)
            assert not marker.exists()
            assert not any(str(e.get("event", "")).startswith("FT RECOVERED") for e in honest.events())
            lines = [e for e in honest.events() if str(e.get("event", "")).startswith("FT REFUSED: not taking")]
            assert len(lines) == 1 and "not minerd's" in lines[0]["event"], lines
            assert not any("StateRefused" in str(e.get("exception", "")) for e in honest.events())  # no traceback
        finally:
            stop(lighthouse)

    def test_a_peer_without_the_token_gets_no_state(self, tmp_path: Path, miner_factory) -> None:
        port = free_port()
        lighthouse = start_lighthouse(port, 1, tmp_path / "lighthouse.log")
        try:
            honest = miner_factory(tmp_path / "h", replica_sets(tmp_path / "h", port, 0, "ft.min_replicas=1"))
            wait_until(lambda: len(committed(honest)) >= 2, 90, "the honest group training", honest)
            other = token_file(tmp_path / "elsewhere", b"not the group's secret, 36 bytes...")
            sets = [s for s in replica_sets(tmp_path / "s", port, 1, "ft.min_replicas=1")
                    if not s.startswith("ft.token_file=")] + [f"ft.token_file={other}"]
            stranger = miner_factory(tmp_path / "s", sets)

            def said(x: MinerProcess, text: str) -> bool:
                return any(str(e.get("event", "")).startswith("FT REFUSED") and text in str(e["event"])
                           for e in x.events())

            wait_until(lambda: said(honest, "asked for this replica's state: no valid signature")
                       and said(stranger, "did not send its state: it refused this replica's token"), 90,
                       "both sides saying the stranger was refused", honest, stranger)
            assert not any(str(e.get("event", "")).startswith("FT RECOVERED") for e in stranger.events())
            assert honest.proc.poll() is None
        finally:
            stop(lighthouse)


class TorchrunGroup:
    """One replica group of two ranks under torchrun, in a session of its own (killed whole, by its id)."""

    def __init__(self, state: Path, sets: list[str]) -> None:
        self.log = state.parent / f"{state.name}-{time.monotonic_ns()}.log"
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "daemon", "run"]
        for s in sets:
            args += ["--set", s]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict]:
        return json_records(self.text())

    def committed(self, rank: int) -> list[dict]:
        return [e for e in self.events() if e.get("event") == "outer step applied" and e.get("committed")
                and e.get("rank") == rank]

    def kill(self) -> None:
        """SIGKILL the workers, then the agent, as a machine that dies: torchrun starts each worker
        in a session of its own, so they are found as the agent's children, by pid."""
        if self.proc.poll() is None:
            for pid in children(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The fields after the command name (which may hold spaces): state, ppid, ...
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def group_sets(tmp: Path, lighthouse: int, group: int, *extra: str, task: str = "twotower") -> list[str]:
    """Replica group ``group``'s settings under torchrun: every rank finds a free API port itself."""
    own = replica_sets(tmp / f"g{group}", lighthouse, group, "ft.min_replicas=1", *extra, task=task)
    return [s for s in own if not s.startswith("api.port=")] + ["api.port=0"]


def start_groups(tmp: Path, sets: Callable[[int], list[str]], timeout: float = 240) -> list[TorchrunGroup]:
    """Two replica groups of two ranks, once every rank of both has taken part in one outer step."""
    groups = [TorchrunGroup(tmp / f"g{i}", sets(i)) for i in range(2)]
    try:
        wait_until(lambda: all(any(e.get("participants") == 2 for e in g.committed(r)) for g in groups
                               for r in (0, 1)), timeout, "both groups, both ranks, in one outer step", *groups)
    except BaseException:
        for g in groups:
            g.kill()
        raise
    return groups


def group_digests(groups: list[TorchrunGroup], after: int) -> dict[int, dict[tuple[int, int], str]]:
    """global step (past ``after``) -> (group index, rank) -> parameter digest."""
    table: dict[int, dict[tuple[int, int], str]] = defaultdict(dict)
    for gi, g in enumerate(groups):
        for e in g.events():
            if "param_digest" in e and e["global_step"] > after:
                table[e["global_step"]][(gi, e["rank"])] = e["param_digest"]
    return table


class TestTorchrunGroups:
    """Replica groups of two ranks each (torchrun): DDP inside a group, torchft's DiLoCo across groups
    (the common layout: a machine's GPUs in step, machines in outer steps)."""

    def test_a_group_dies_and_recovers_rank_by_rank(self, tmp_path: Path) -> None:
        port = free_port()
        lighthouse = start_lighthouse(port, 1, tmp_path / "lighthouse.log")
        groups: list[TorchrunGroup] = []

        def sets(i: int) -> list[str]:
            return group_sets(tmp_path, port, i, "train.effective_batch_size=128", "train.sync=ddp")

        try:
            groups = start_groups(tmp_path, sets)
            a, b = groups
            # 1. Kill group b whole; group a goes on alone, the same processes.
            b.kill()
            base = len(a.committed(0))
            wait_until(lambda: all(sum(e.get("participants") == 1 for e in a.committed(r)[base:]) >= 3
                                 for r in (0, 1)), 90, "three outer steps of the surviving group", a)
            assert sum(e.get("event") == "FT CONNECTED: lighthouse reached" for e in a.events()) == 2
            # 2. Restart it: each rank takes the state of the same rank of group a.
            b = groups[1] = TorchrunGroup(tmp_path / "g1", sets(1))
            wait_until(lambda: sum(str(e.get("event", "")).startswith("FT RECOVERED") for e in b.events()) == 2,
                     120, "both ranks of the restarted group recovering", *groups)
            joined = max(e["global_step"] for e in b.events() if str(e.get("event", "")).startswith("FT RECOVERED"))

            def digests() -> dict[int, set[str]]:
                table = group_digests(groups, joined)
                return {step: set(v.values()) for step, v in table.items() if len(v) == 4}

            wait_until(lambda: any(len(v) == 1 for v in digests().values()), 90,
                     "equal parameters on all four ranks after the recovery", *groups)
            assert min(s for s, v in digests().items() if len(v) == 1) <= joined + 5  # within one outer step
            assert "Traceback" not in a.log.read_text(errors="replace")
        finally:
            for g in groups:
                g.kill()
            stop(lighthouse)
