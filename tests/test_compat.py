"""The compatibility matrix: both scripts against every iperf3 release that operators run.

`.ci/build-iperf3` builds 3.7 (Ubuntu 20.04), 3.9 (Ubuntu 22.04, RHEL 9), 3.16 (Ubuntu 24.04),
3.18 (Debian 13) and 3.21 (upstream) from their release tarballs; the system's iperf3 (Debian 12:
3.12) joins them. Each test runs once per version, with that version as client and server. A
version that is not built is skipped, or fails the run under REQUIRE_IPERF3_VERSIONS=1 (CI).

Where a version cannot do something at all, the test is skipped by a version check that names the
iperf3 bug; it never passes silently.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import iperf_server
from conftest import (CLIENT_LOGIN_BUG, CLIENT_SCRIPT, MATRIX, PASSWORD, QUICK, USER,
                      IperfServer, ServerHost, assert_quiet_success, built_iperf3,
                      client_login_broken, free_port, hold_server, iperf3_path, iperf3_version,
                      kill_pid, kill_process, paced, require, run_script, wait_until)


def matrix_iperf3(version):
    """Path of the iperf3 of `version` ("system": the one on PATH), or skip/fail the test."""
    if version == "system":
        path = iperf3_path()
        require(path is not None, "iperf3", "REQUIRE_IPERF3")
        return path
    path = built_iperf3(version)
    require(path is not None, "iperf3 %s (run .ci/build-iperf3)" % version,
            "REQUIRE_IPERF3_VERSIONS")
    return path


@pytest.fixture(params=MATRIX + ("system",))
def iperf3_of(request):
    """The iperf3 under test, one release per parameter."""
    return matrix_iperf3(request.param)


@pytest.fixture
def watched(tmp_path, iperf3_of):
    """An iperf_server.py host run with this version; kills every daemon it started."""
    host = ServerHost(tmp_path, free_port())
    host.iperf3 = iperf3_of
    try:
        yield host
    finally:
        for pid in host.daemons():
            kill_pid(pid)


@pytest.fixture
def servers(iperf3_of, start_iperf3_server):
    """Factory for foreground servers of this version (extra arguments allowed)."""
    return lambda extra=(): start_iperf3_server(extra, executable=iperf3_of)


def server_auth_args(credentials):
    return ["--rsa-private-key-path", str(credentials[0]),
            "--authorized-users-path", str(credentials[2])]


def client(iperf3, port, results, *more, env=None):
    args = ["--iperf3", iperf3, "--server", "127.0.0.1", "--port", port, *QUICK, "-P", "2",
            "-d", results, *more]
    return run_script(CLIENT_SCRIPT, paced(args, iperf3), env=env)


def login_args(credentials):
    return ["--username", USER, "--rsa-public-key-path", credentials[1]]


def ledger(results):
    with open(str(Path(results) / "results.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


# --- the watchdog ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_watchdog_starts_keeps_and_replaces_a_hung_daemon(watched):
    assert_quiet_success(watched.run("--iperf3", watched.iperf3))
    pid = watched.pid()
    assert_quiet_success(watched.run("--iperf3", watched.iperf3, "-v"))
    assert watched.pid() == pid, watched.log()
    assert "answered" in watched.log()
    done = watched.run("--iperf3", watched.iperf3, "--status")
    assert done.returncode == 0 and "settings differ" not in done.stdout, done.stdout
    os.kill(pid, signal.SIGSTOP)
    assert_quiet_success(watched.run("--iperf3", watched.iperf3))
    assert watched.pid() != pid
    assert watched.daemons() == [watched.pid()]
    assert "failed its health probe: stopped" in watched.log()


@pytest.mark.slow
def test_watchdog_keeps_a_busy_daemon(watched):
    assert_quiet_success(watched.run("--iperf3", watched.iperf3))
    pid = watched.pid()
    holder = hold_server(watched.iperf3, watched.port)
    try:
        assert_quiet_success(watched.run("--iperf3", watched.iperf3))
        assert watched.pid() == pid
        assert "is busy with a test" in watched.log()
    finally:
        kill_process(holder)


def test_watchdog_keeps_an_authenticating_daemon(watched, credentials):
    auth = server_auth_args(credentials)
    assert_quiet_success(watched.run("--iperf3", watched.iperf3, *auth))
    pid = watched.pid()
    for _ in range(2):  # consecutive cron runs: never a restart
        assert_quiet_success(watched.run("--iperf3", watched.iperf3, *auth))
    assert watched.pid() == pid
    assert watched.log().count("starting iperf3") == 1
    for flags in (auth, []):  # --status as the crontab line has it, and as an admin types it
        done = watched.run("--iperf3", watched.iperf3, "--status", *flags)
        assert done.returncode == 0 and "authentication required" in done.stdout, done.stdout


def test_watchdog_adds_only_the_guards_its_version_has(watched):
    assert_quiet_success(watched.run("--iperf3", watched.iperf3))
    argv = iperf_server.daemon_argv_of(watched.pid(), watched.pidfile)
    version = iperf3_version(watched.iperf3)
    assert ("--snd-timeout" in argv) == (version >= (3, 12))


def test_legacy_clients_only_where_the_version_has_the_switch(watched, credentials):
    done = watched.run("--iperf3", watched.iperf3, "--legacy-clients",
                       *server_auth_args(credentials))
    if iperf3_version(watched.iperf3) >= (3, 17):
        assert_quiet_success(done)
        argv = iperf_server.daemon_argv_of(watched.pid(), watched.pidfile)
        assert "--use-pkcs1-padding" in argv
    else:
        assert done.returncode == 2 and "3.17 or newer" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and watched.daemons() == []


# --- the client -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_client_records_the_figures_iperf3_measured(iperf3_of, servers, tmp_path):
    server = servers()
    done = client(iperf3_of, server.port, tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    rows = ledger(tmp_path)
    assert [row["status"] for row in rows] == ["ok", "ok"]
    for row in rows:
        with open(str(tmp_path / row["file"])) as handle:
            end = json.load(handle)["end"]
        assert float(row["sent_bps"]) == end["sum_sent"]["bits_per_second"]
        assert float(row["received_bps"]) == end["sum_received"]["bits_per_second"]
    report = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--format", "json"])
    summary = json.loads(report.stdout)["links"][0]["summary"]
    for row in rows:
        assert summary[row["direction"]]["median_bps"] == float(row["received_bps"])


def test_client_records_a_server_that_is_down(iperf3_of, tmp_path):
    done = client(iperf3_of, free_port(), tmp_path)
    assert done.returncode == 1
    rows = ledger(tmp_path)
    assert [row["status"] for row in rows] == ["error", "error"]
    assert all(row["error"] and not row["received_bps"] for row in rows)
    # The rebuild reaches the same verdict from the files alone.
    assert run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--rebuild"]).returncode == 0
    assert [row["status"] for row in ledger(tmp_path)] == ["error", "error"]


def test_client_waits_out_a_busy_server_and_says_so(iperf3_of, servers, tmp_path):
    server = servers()
    holder = hold_server(iperf3_of, server.port)
    try:
        done = client(iperf3_of, server.port, tmp_path)
    finally:
        kill_process(holder)
    assert done.returncode == 1
    assert [row["status"] for row in ledger(tmp_path)] == ["error", "error"]
    log = "".join(path.read_text() for path in tmp_path.glob("*_iperf_mon.log"))
    assert "server still busy" in log, log


@pytest.mark.slow
def test_client_stopped_by_sigterm_keeps_the_partial_result(iperf3_of, servers, tmp_path):
    server = servers()
    args = ["--iperf3", iperf3_of, "--server", "127.0.0.1", "--port", server.port, "-t", "8",
            "-P", "2", "-d", tmp_path, "--busy-wait", "0"]
    proc = subprocess.Popen([sys.executable, str(CLIENT_SCRIPT), *paced(args, iperf3_of)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    try:
        # Once iperf3 runs its test (its result file is not written yet), stop the client.
        assert wait_until(lambda: list(tmp_path.glob("*_iperf_mon.log")), timeout=10)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        kill_process(proc)
    assert proc.returncode == 128 + signal.SIGTERM
    (row,) = ledger(tmp_path)
    assert row["status"] == "error" and "interrupted by SIGTERM" in row["error"]
    assert (tmp_path / row["file"]).exists()


# --- authentication -------------------------------------------------------------------------------

@pytest.mark.slow
def test_login_with_the_right_password(iperf3_of, servers, credentials, tmp_path):
    if client_login_broken(iperf3_of):
        pytest.skip(CLIENT_LOGIN_BUG)
    server = servers(server_auth_args(credentials))
    done = client(iperf3_of, server.port, tmp_path, *login_args(credentials),
                  env={"IPERF3_PASSWORD": PASSWORD})
    assert (done.returncode, done.stderr) == (0, "")
    assert [row["status"] for row in ledger(tmp_path)] == ["ok", "ok"]


def test_login_with_a_wrong_password_says_so(iperf3_of, servers, credentials, tmp_path):
    server = servers(server_auth_args(credentials))
    done = client(iperf3_of, server.port, tmp_path, *login_args(credentials),
                  env={"IPERF3_PASSWORD": "not-it"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    bug = client_login_broken(iperf3_of)
    for line in lines:
        assert ("cannot log in at all" if bug else "login refused") in line, line
    assert [row["status"] for row in ledger(tmp_path)] == ["error", "error"]


def test_no_login_against_an_authenticating_server(iperf3_of, servers, credentials, tmp_path):
    server = servers(server_auth_args(credentials))
    done = client(iperf3_of, server.port, tmp_path)
    assert done.returncode == 1
    rows = ledger(tmp_path)
    assert [row["status"] for row in rows] == ["error", "error"]
    if iperf3_version(iperf3_of) < (3, 19):  # 3.21 only closes the connection
        assert "requires a login" in done.stderr, done.stderr


# --- mixed pairs: a client before 3.17 (PKCS#1) and a server from 3.17 (OAEP) ---------------------

@pytest.fixture
def old_and_new():
    """(3.12 or another pre-3.17 iperf3, 3.21)."""
    old = iperf3_path()
    require(old is not None, "iperf3", "REQUIRE_IPERF3")
    if iperf3_version(old) >= (3, 16):
        old = matrix_iperf3("3.9")
    return old, matrix_iperf3("3.21")


@pytest.mark.slow
def test_old_client_new_server_is_explained_then_fixed_by_legacy_clients(
        old_and_new, credentials, tmp_path):
    old, new = old_and_new
    host = ServerHost(tmp_path, free_port())
    auth = server_auth_args(credentials)
    try:
        assert_quiet_success(host.run("--iperf3", new, *auth))
        done = client(old, host.port, tmp_path / "r1", *login_args(credentials),
                      env={"IPERF3_PASSWORD": PASSWORD})
        assert done.returncode == 1 and "--legacy-clients" in done.stderr, done.stderr
        assert_quiet_success(host.run("--iperf3", new, "--legacy-clients", *auth))
        done = client(old, host.port, tmp_path / "r2", *login_args(credentials),
                      env={"IPERF3_PASSWORD": PASSWORD})
        assert (done.returncode, done.stderr) == (0, "")
        assert [row["status"] for row in ledger(tmp_path / "r2")] == ["ok", "ok"]
    finally:
        for pid in host.daemons():
            kill_pid(pid)


def test_new_client_old_server_is_explained(old_and_new, credentials, tmp_path):
    old, new = old_and_new
    server = IperfServer(old, free_port(), server_auth_args(credentials))
    try:
        done = client(new, server.port, tmp_path, *login_args(credentials),
                      env={"IPERF3_PASSWORD": PASSWORD})
    finally:
        server.stop()
    assert done.returncode == 1
    assert "OAEP" in done.stderr and "older than iperf3 3.17" in done.stderr, done.stderr
