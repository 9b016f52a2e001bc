"""iperf_server.py never takes a working server down (issue 18): two ports on one host, a
settings change iperf3 refuses, an authenticating 3.21 daemon after real logins, and --status
typed without the crontab line's flags.

The cases that depend on iperf3's version run with the iperf3 on PATH and with every build of
the compatibility matrix (conftest's built_iperf3: IPERF3_MATRIX, else the build cache); a case
is generated only for the versions it applies to.
"""

import os
import shutil
import signal
import subprocess

import pytest

import iperf_client
import iperf_server
from conftest import (CLIENT_LOGIN_BUG, CLIENT_SCRIPT, MATRIX, PACE, PASSWORD, QUICK, SERVER_SCRIPT,
                      USER, ServerHost, assert_one_line_error, assert_quiet_success, built_iperf3,
                      client_login_broken, free_port, iperf3_path, iperf3_version, kill_pid,
                      listening, pid_alive, paced, pids_naming, require, run_script)


def matrix_builds():
    """{version: path} of each build of the matrix (built_iperf3), less the one that is the
    iperf3 on PATH already. A missing build is left out, or fails the collection under
    REQUIRE_IPERF3_VERSIONS=1 (CI): its cases are generated here, so a skip could not say so."""
    on_path = shutil.which("iperf3")
    on_path = os.path.realpath(on_path) if on_path else None
    builds = {}
    for version in MATRIX:
        path = built_iperf3(version)
        if path is None and os.environ.get("REQUIRE_IPERF3_VERSIONS") == "1":
            pytest.fail("iperf3 %s is required (REQUIRE_IPERF3_VERSIONS=1) but not built (run "
                        ".ci/build-iperf3)" % version, pytrace=False)
        if path is not None and os.path.realpath(path) != on_path:
            builds[version] = path
    return builds


BUILT = matrix_builds()


def iperf3s_under_test():
    """{name: (path, version)}: the iperf3 on PATH ("path"), then each build of the matrix.
    Read when the tests are collected, so that a case that does not apply to a version is never
    generated for it (a skip would hide a missing build; CI allows none but iperf3's own bugs)."""
    found = {}
    on_path = iperf3_path()
    if on_path:
        found["path"] = (on_path, iperf3_version(on_path))
    for name, path in BUILT.items():
        found[name] = (path, iperf3_version(path))
    return found


UNDER_TEST = iperf3s_under_test()


def iperf3_params(applies=lambda version: True):
    """pytest params of each iperf3 under test whose version `applies`."""
    return [pytest.param(path, id=name) for name, (path, version) in sorted(UNDER_TEST.items())
            if version is not None and applies(version)]


@pytest.fixture(params=iperf3_params())
def any_iperf3(request):
    """An iperf3 under test: the one on PATH, then each build of the matrix."""
    return request.param


@pytest.fixture
def watched(tmp_path, any_iperf3):
    """A ServerHost whose runs use `any_iperf3`; kills every daemon the test started."""
    host = ServerHost(tmp_path, free_port())
    host.iperf3 = any_iperf3
    host.version = iperf3_version(any_iperf3)
    try:
        yield host
    finally:
        kill_all_naming(tmp_path)


def kill_all_naming(folder):
    for _ in range(2):
        for pid in pids_naming(str(folder)):
            kill_pid(pid)


def probe_measures(iperf3, port):
    """True when a plain client measures against `port` (the server answers)."""
    argv = [iperf3, "-c", "127.0.0.1", "-p", str(port), "-n", "1K", "-i", "0.1", "-J"]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
    return '"sum_received"' in done.stdout


# --- Two ports on one host ------------------------------------------------------------------------

def test_default_files_follow_the_port():
    home = os.path.expanduser("~")
    assert iperf_server.port_file(iperf_server.IPERF_PID_FILE, 5201) == home + "/iperf.pid"
    assert iperf_server.port_file(iperf_server.IPERF_PID_FILE, 5202) == home + "/iperf-5202.pid"
    assert iperf_server.port_file(iperf_server.IPERF_MONITOR_LOG, 5202) == \
        home + "/iperf_monitor-5202.log"


def test_two_ports_with_default_files_keep_their_daemons(tmp_path, iperf3):
    ports = [free_port(), free_port()]
    env = {"HOME": str(tmp_path)}
    try:
        pids = {}
        for round_ in range(4):
            for port in ports:
                done = run_script(SERVER_SCRIPT, ["-p", port, "--iperf3", iperf3], env=env)
                assert_quiet_success(done)
                with open(str(tmp_path / ("iperf-%d.pid" % port)), "rb") as handle:
                    pid = iperf_server.parse_pidfile(handle.read())
                assert pids.setdefault(port, pid) == pid, "round %d restarted: %s" % (
                    round_, (tmp_path / ("iperf_monitor-%d.log" % port)).read_text())
        for port in ports:
            assert listening(port) and probe_measures(iperf3, port)
            assert (tmp_path / ("iperf_monitor-%d.log" % port)).exists()
            assert (tmp_path / ("iperf-%d.pid.state" % port)).exists()
        assert not (tmp_path / "iperf.pid").exists()
        assert not (tmp_path / "iperf_monitor.log").exists()
    finally:
        kill_all_naming(tmp_path)


def test_a_daemon_of_the_old_shared_default_pidfile_is_replaced(tmp_path, iperf3):
    """Up to 2.2 a `-p 5202` line wrote ~/iperf.pid: after the upgrade its daemon holds the
    port, and the line's first run replaces it with one writing ~/iperf-5202.pid."""
    port = free_port()
    env = {"HOME": str(tmp_path)}
    old_pidfile = str(tmp_path / "iperf.pid")
    try:
        assert_quiet_success(run_script(SERVER_SCRIPT, ["-p", port, "--pidfile", old_pidfile,
                                                        "--iperf3", iperf3], env=env))
        old = iperf_server.our_daemons(old_pidfile)
        assert_quiet_success(run_script(SERVER_SCRIPT, ["-p", port, "--iperf3", iperf3],
                                        env=env))
        new_pidfile = str(tmp_path / ("iperf-%d.pid" % port))
        assert iperf_server.our_daemons(old_pidfile) == [] and not pid_alive(old[0])
        assert len(iperf_server.our_daemons(new_pidfile)) == 1
        assert probe_measures(iperf3, port)
        assert "the pidfile of version 2.2" in (
            tmp_path / ("iperf_monitor-%d.log" % port)).read_text()
    finally:
        kill_all_naming(tmp_path)


def test_a_shared_pidfile_on_another_port_is_named_and_left_alone(host, iperf3):
    assert_quiet_success(host.run())
    pid = host.pid()
    other_port = free_port()
    for _ in range(2):
        done = host.run(port=other_port)
        assert_one_line_error(done, 1, "another watchdog", "--pidfile")
        assert host.pid() == pid and pid_alive(pid)
        assert_quiet_success(host.run())
        assert host.pid() == pid
    assert probe_measures(iperf3, host.port)


def test_a_shared_pidfile_with_other_settings_settles_on_one_daemon(host):
    """Two crontab lines, one port, one pidfile, other flags: the first run of the second line
    looks like a settings change; from then on the daemon stays and the other line says why."""
    assert_quiet_success(host.run())
    assert_quiet_success(host.run("--", "--forceflush"))
    pid = host.pid()
    for _ in range(2):
        done = host.run()
        assert_one_line_error(done, 1, "another watchdog", "--pidfile")
        assert_quiet_success(host.run("--", "--forceflush"))
        assert host.pid() == pid


# --- A settings change is proven before the working daemon stops ---------------------------------

REFUSED_CHANGES = [
    # (arguments after --, the first version that accepts them: the case applies before it)
    (["--rcv-timeout", "30000"], (3, 10)),
    (["--json-stream"], (3, 17)),
    (["--logfile", "/missing/dir/x.log"], None),
    (["--bogus"], None),
    # Relative: not checked beforehand; the daemon on the side port fails in silence, after
    # forking (3.7 and 3.9 spin without listening).
    (["--logfile=missing/dir/x.log"], None),
]


def refused_change_params():
    """(extra, iperf3) for each refused change and each iperf3 it applies to (before the
    version that accepts it)."""
    params = []
    for extra, accepted_since in REFUSED_CHANGES:
        name = extra[0].split("=")[0] + ("-relative" if "=" in extra[0] else "")
        for path in iperf3_params(lambda version: not accepted_since or version < accepted_since):
            params.append(pytest.param(extra, path.values[0], id="%s-%s" % (name, path.id)))
    return params


@pytest.mark.parametrize("extra,any_iperf3", refused_change_params())
def test_a_refused_settings_change_keeps_the_old_daemon(watched, extra):
    assert_quiet_success(watched.run("--iperf3", watched.iperf3))
    pid = watched.pid()
    done = watched.run("--iperf3", watched.iperf3, "--", *extra)
    assert_one_line_error(done, 1, "refused")
    assert watched.pid() == pid and watched.daemons() == [pid]
    assert probe_measures(watched.iperf3, watched.port)
    assert not os.path.exists(watched.pidfile + ".trial")
    assert not pids_naming(watched.pidfile + ".trial")
    assert_quiet_success(watched.run("--iperf3", watched.iperf3))
    assert watched.pid() == pid


def test_new_settings_failing_on_the_real_port_bring_the_old_back(host, iperf3, tmp_path):
    """Tried on the side port, the new settings work; on the real port they fail (a wrapper
    stands in for what no real iperf3 does on demand): the old settings serve again."""
    wrapper = tmp_path / "bin" / "iperf3"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/bash\n"
        "# as iperf3 on a port where --forceflush fails, else the real one (argv[0] kept)\n"
        "if [[ \" $* \" == *\" -p %d \"* && \" $* \" == *\" --forceflush \"* ]]; then\n"
        "    echo 'iperf3: error - refused on this port' >&2; exit 1\n"
        "fi\n"
        "exec -a \"$0\" %s \"$@\"\n" % (host.port, iperf3))
    wrapper.chmod(0o755)
    assert_quiet_success(host.run("--iperf3", wrapper))
    done = host.run("--iperf3", wrapper, "--", "--forceflush")
    assert_one_line_error(done, 1, "refused", "old settings again", "refused on this port")
    pid = host.pid()
    assert host.daemons() == [pid]
    assert "--forceflush" not in iperf_server.daemon_argv_of(pid, host.pidfile)
    assert probe_measures(iperf3, host.port)
    assert_quiet_success(host.run("--iperf3", wrapper))
    assert host.pid() == pid


def test_an_accepted_settings_change_still_restarts(watched):
    assert_quiet_success(watched.run("--iperf3", watched.iperf3))
    old = watched.pid()
    assert_quiet_success(watched.run("--iperf3", watched.iperf3, "--", "--forceflush"))
    new = watched.pid()
    assert new != old and not pid_alive(old)
    assert "--forceflush" in iperf_server.daemon_argv_of(new, watched.pidfile)
    assert probe_measures(watched.iperf3, watched.port)


# --- Authentication: a daemon that drops the login-less probe has answered ------------------------

def auth_flags(credentials):
    return ["--rsa-private-key-path", credentials[0], "--authorized-users-path", credentials[2]]


def logged_in_client(watched, credentials, results):
    """iperf_client.py's forward and reverse test with a login, as cron runs it."""
    return run_script(CLIENT_SCRIPT, paced([
        "--server", "127.0.0.1", "--port", watched.port, *QUICK, "-P", "2", "-d", results,
        "--iperf3", watched.iperf3, "--username", USER, "--rsa-public-key-path",
        credentials[1]],
        watched.iperf3),
        env={"IPERF3_PASSWORD": PASSWORD})


def test_logged_in_tests_between_runs_keep_one_daemon(watched, credentials, tmp_path):
    if client_login_broken(watched.iperf3):
        pytest.skip(CLIENT_LOGIN_BUG)
    flags = ["--iperf3", watched.iperf3] + auth_flags(credentials)
    assert_quiet_success(watched.run(*flags))
    pid = watched.pid()
    # Two runs of the client, four logins (each run tests both ways), each run followed by the
    # watchdog's: a 3.21 daemon drops the login-less probe from the first login on.
    for round_ in range(2):
        tested = logged_in_client(watched, credentials, tmp_path / "results")
        assert tested.returncode == 0, tested.stderr
        assert_quiet_success(watched.run(*flags))
        assert watched.pid() == pid, "round %d: %s" % (round_, watched.log())
    status = watched.run("--status", *flags)
    assert status.returncode == 0 and "answered" in status.stdout, status.stdout
    status = run_script(SERVER_SCRIPT, ["--pidfile", watched.pidfile, "--log-file",
                                        watched.log_file, "--status"])
    assert status.returncode == 0 and "answered" in status.stdout, status.stdout


def old_client_test(client, port, public_key, *more):
    env = dict(os.environ, IPERF3_PASSWORD=PASSWORD)
    return subprocess.run([client, "-c", "127.0.0.1", "-p", str(port), "-t", "1", "-P", "2",
                           "-b", PACE, "-J", "--get-server-output", "--username", USER,
                           "--rsa-public-key-path", str(public_key), *more],
                          env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)


@pytest.mark.parametrize("any_iperf3", iperf3_params(
    lambda version: version >= iperf_server.PKCS1_PADDING_SINCE))
def test_legacy_logins_between_runs_keep_one_daemon(watched, credentials):
    """3.7 clients log in to a 3.17+ server run with --legacy-clients."""
    old_client = built_iperf3("3.7")
    require(old_client is not None, "the iperf3 3.7 build (.ci/build-iperf3)",
            "REQUIRE_IPERF3_VERSIONS")
    flags = ["--iperf3", watched.iperf3, "--legacy-clients"] + auth_flags(credentials)
    assert_quiet_success(watched.run(*flags))
    pid = watched.pid()
    for round_, more in enumerate([(), ("-R",), (), ("-R",)]):
        tested = old_client_test(old_client, watched.port, credentials[1], *more)
        assert '"sum_received"' in tested.stdout, tested.stdout[-500:]
        assert_quiet_success(watched.run(*flags))
        assert watched.pid() == pid, "round %d: %s" % (round_, watched.log())
    status = watched.run("--status", *flags)
    assert status.returncode == 0 and "answered" in status.stdout, status.stdout


def test_a_hung_authenticating_daemon_is_still_replaced(watched, credentials):
    flags = ["--iperf3", watched.iperf3] + auth_flags(credentials)
    assert_quiet_success(watched.run(*flags))
    old = watched.pid()
    os.kill(old, signal.SIGSTOP)
    try:
        assert_quiet_success(watched.run(*flags))
        assert watched.pid() != old
        assert "failed its health probe: stopped" in watched.log()
    finally:
        kill_pid(old)


@pytest.mark.parametrize("error", [
    "unable to write to stream socket: Bad file descriptor",
    "unable to receive control message: Connection reset by peer",
    "unable to write to stream socket: Transport endpoint is not connected",
])
def test_a_dropped_probe_is_an_answer_only_from_a_listening_authenticating_server(error):
    stdout = '{"start": {}, "end": {}, "error": "%s"}' % error
    assert iperf_server.classify_probe(1, stdout, "", False, True)[0] == "dropped"
    assert iperf_server.classify_probe(1, stdout, "", False, False)[0] == "fail"
    refused = '{"error": "unable to connect to server: Connection refused"}'
    assert iperf_server.classify_probe(1, refused, "", False, True)[0] == "fail"


def test_a_dropped_probe_counts_only_while_the_port_is_listened_on(fake_iperf3, iperf3_server):
    """3.9 says "Bad file descriptor" of a server that is down: no answer then."""
    fake = fake_iperf3("""
        print(json.dumps({"start": {}, "end": {},
                          "error": "unable to send control message: Bad file descriptor"}))
        sys.exit(1)
    """)
    watchdog = iperf_server.Watchdog(str(fake), "/nonexistent/iperf.pid", free_port(), None, [],
                                     10, True, auth=("private.pem", "users"))
    assert watchdog.probe()[0] == "fail"
    assert watchdog.probe(port=iperf3_server.port)[0] == "ok"


# --- --status and the client's login hint ---------------------------------------------------------

def test_status_without_the_crontab_flags_adds_no_settings_note(host):
    assert_quiet_success(host.run("--", "--forceflush"))
    for typed in ([], ["-p", str(host.port)]):
        done = run_script(SERVER_SCRIPT, ["--pidfile", host.pidfile, "--log-file",
                                          host.log_file, "--status", *typed])
        assert done.returncode == 0 and "answered" in done.stdout, done.stdout
        assert "settings differ" not in done.stdout
    done = host.run("--status", "-B", "127.0.0.1")
    assert "its settings differ from these flags" in done.stdout


def test_the_wrong_password_hint_names_no_server_version_it_cannot_know():
    hint = iperf_client.explain_error("test authorization failed", "", (3, 12), True)
    assert "an iperf3 3.17+ server refuses" not in hint
    assert "if the server runs iperf3 3.17 or newer" in hint and "--legacy-clients" in hint
