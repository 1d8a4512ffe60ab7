"""The shared launcher (kit/topology.py) on real processes: it stops exactly the processes it
started, by PID (frozen ones too, stubborn ones with SIGKILL), tells its own PIDs from others',
speaks AUTH, and says what is missing when Sentinels do not agree."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit import topology
from kit.topology import LaunchError, RespError, Running, call, spawn, stop_all
from testkit.redis import running_topology


def _exited(proc: subprocess.Popen[bytes], within: float = 10.0) -> bool:
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_stop_stops_its_own_frozen_server_and_leaves_another_redis_alone(tmp_path: Path) -> None:
    # A bystander redis-server the launcher did not start (like the machine's own 6379).
    other_port = topology.free_port()
    bystander = subprocess.Popen(
        [topology.REDIS_SERVER, "--port", str(other_port), "--bind", "127.0.0.1", "--save", ""],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        topology.poll(lambda: call(other_port, "PING") == "PONG", 10, "the bystander")
        with running_topology(tmp_path / "t", sentinels=False) as topo:
            node = topo.servers[0]
            topo.signal(node, signal.SIGSTOP)  # a frozen process cannot handle SIGTERM alone
            proc = node.proc
            assert proc is not None
        assert _exited(proc), "the frozen server still runs after the topology stopped"
        assert call(other_port, "PING") == "PONG"
    finally:
        bystander.terminate()
        bystander.wait(10)


def test_stop_all_escalates_to_sigkill_and_says_so(tmp_path: Path) -> None:
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    ignores_term += "print('armed:', 1 + 1, flush=True); time.sleep(60)"
    log = tmp_path / "stubborn.log"  # starts with the command line, so look for its output
    proc = spawn([sys.executable, "-c", ignores_term], cwd=tmp_path, log=log)
    topology.poll(lambda: "armed: 2" in log.read_text(), 10, "the child to ignore SIGTERM")
    t0 = time.monotonic()
    killed = stop_all([Running.child(proc)], grace=0.5)
    assert killed == [proc.pid]
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 10


def test_runs_in_tells_a_pid_file_of_ours_from_a_reused_pid(tmp_path: Path) -> None:
    ours, elsewhere = tmp_path / "state", tmp_path / "other"
    ours.mkdir()
    elsewhere.mkdir()
    pid_file = ours / "sleeper.pid"
    proc = spawn(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        cwd=ours,
        log=ours / "sleeper.log",
        pid_file=pid_file,
        detach=True,
    )
    try:
        pid = topology.read_pid(pid_file)
        assert pid == proc.pid
        assert topology.runs_in(pid, ours)
        # The same PID seen from another state directory is not "ours": never signalled.
        assert not topology.runs_in(pid, elsewhere)
    finally:
        stop_all([Running.child(proc)])
    assert not topology.runs_in(proc.pid, ours)  # gone (and reaped)


def test_password_is_required_and_spoken(tmp_path: Path) -> None:
    with running_topology(tmp_path / "t", sentinels=False, password="s3cret") as topo:
        port = topo.servers[0].port
        with pytest.raises(RespError, match="NOAUTH"):
            call(port, "SET", "k", "v")
        assert call(port, "SET", "k", "v", password="s3cret") == "OK"
        with pytest.raises(RespError, match="WRONGPASS"):
            call(port, "PING", password="wrong")


def test_sentinel_problems_names_what_is_missing(tmp_path: Path) -> None:
    with running_topology(tmp_path / "t") as topo:
        ports = [s.port for s in topo.sentinels]
        master = topo.master()
        assert topology.sentinel_problems(ports, topo.master_name, replicas=2) == []
        wrong = topology.sentinel_problems(
            ports, topo.master_name, replicas=2, master_port=master.port + 1
        )
        assert len(wrong) == 3 and all("names the master at port" in p for p in wrong)
        dead = topo.sentinels[2]
        topo.signal(dead, signal.SIGKILL)
        problems = topology.sentinel_problems(ports, topo.master_name, replicas=2)
        assert any(p.startswith(f"sentinel :{dead.port}:") for p in problems), problems


def test_a_server_that_exits_at_start_is_reported_at_once_with_its_log(tmp_path: Path) -> None:
    topo = topology.Topology(tmp_path)
    try:
        first = topo.add_server("first")
        topo.wait_answers(first, 10)
        clash = topo.add_server("clash", port=first.port)  # taken: redis-server exits
        t0 = time.monotonic()
        with pytest.raises(LaunchError, match="clash exited with status") as err:
            topo.wait_answers(clash, 60)
        # Not at the deadline (the first server answers PING on that port all along) ...
        assert time.monotonic() - t0 < 30
        # ... and the message carries the server's own reason.
        assert "Address already in use" in str(err.value)
    finally:
        topo.stop()
