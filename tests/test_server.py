"""iperf_server.py: the watchdog, against real iperf3 daemons on random free ports."""

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import iperf_server
from conftest import (SERVER_SCRIPT, assert_one_line_error, assert_quiet_success, free_port,
                      hold_server, kill_pid, kill_process, listening, pid_alive, run_script,
                      wait_until)


def test_first_run_starts_a_daemon_and_the_second_keeps_it(host):
    assert_quiet_success(host.run())
    first = host.pid()
    assert host.daemons() == [first]
    assert listening(host.port)
    assert "starting iperf3: not running" in host.log()

    assert_quiet_success(host.run())
    assert host.pid() == first
    assert host.daemons() == [first]


def test_twenty_concurrent_runs_after_kill_9_leave_exactly_one(host):
    assert_quiet_success(host.run())
    os.kill(host.pid(), signal.SIGKILL)  # leaves the pidfile behind, as a crash would
    wait_until(lambda: not host.daemons())
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda _: host.run(), range(20)))
    for done in results:
        assert_quiet_success(done)
    assert host.daemons() == [host.pid()]
    assert listening(host.port)


def test_recycled_pid_is_left_alone_and_a_server_starts(host):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(host.pidfile, "w") as handle:
            handle.write(str(sleeper.pid))
        assert_quiet_success(host.run())
        assert sleeper.poll() is None, "the recycled PID's process was signalled"
        assert host.pid() != sleeper.pid
        assert host.daemons() == [host.pid()]
    finally:
        kill_process(sleeper)


def test_pid_of_another_iperf3_is_left_alone(host, start_iperf3_server):
    """A stale pidfile can name a PID that another iperf3 got after a crash or reboot."""
    foreign = start_iperf3_server()
    with open(host.pidfile, "w") as handle:
        handle.write(str(foreign.proc.pid))
    assert_quiet_success(host.run())
    assert foreign.proc.poll() is None, "another iperf3 was signalled"
    assert host.pid() != foreign.proc.pid
    assert host.daemons() == [host.pid()]
    assert "stale pidfile" in host.log()


def test_daemon_under_another_executable_name_is_recognised(host, iperf3, tmp_path):
    versioned = tmp_path / "iperf-3.12"
    versioned.symlink_to(iperf3)
    assert_quiet_success(host.run("--iperf3", versioned))
    pid = host.pid()
    assert_quiet_success(host.run("--iperf3", versioned))
    assert host.pid() == pid
    assert_quiet_success(host.run("--stop"))
    assert not pid_alive(pid)


def test_same_executable_by_another_path_keeps_the_daemon(host, iperf3, tmp_path):
    """cron's PATH and a shell's may find iperf3 under different names for one file."""
    assert_quiet_success(host.run())
    pid = host.pid()
    alias = tmp_path / "bin" / "iperf3"
    alias.parent.mkdir()
    alias.symlink_to(iperf3)
    assert_quiet_success(host.run("--iperf3", alias))
    assert host.pid() == pid


def test_bind_to_a_host_name(host):
    assert_quiet_success(host.run("-B", "localhost"))
    pid = host.pid()
    assert_quiet_success(host.run("-B", "localhost"))
    assert host.pid() == pid


def test_status_reports_the_daemons_own_port(host):
    assert_quiet_success(host.run())
    done = run_script(SERVER_SCRIPT, ["--pidfile", host.pidfile, "--log-file", host.log_file,
                                      "--status"])  # no -p: as an admin would type it
    assert done.returncode == 0, done.stdout
    assert "port %d" % host.port in done.stdout and "answered" in done.stdout
    assert "settings differ" not in done.stdout  # it cannot know the crontab line's flags


def test_status_with_the_crontab_lines_own_flags_finds_the_same_settings(host):
    """The daemon runs the resolved executable; --status must resolve the bare name too (given
    a settings flag: without one it compares nothing)."""
    assert_quiet_success(host.run())
    done = host.run("--status", "--iperf3", "iperf3")
    assert done.returncode == 0, done.stdout
    assert "answered" in done.stdout
    assert "settings differ" not in done.stdout


def test_stop_and_status_work_without_iperf3(host):
    assert_quiet_success(host.run())
    pid = host.pid()
    env = {"PATH": "/nonexistent"}
    done = host.run("--status", env=env)
    assert done.returncode == 1 and "cannot run" in done.stdout
    assert host.run("--stop", env=env).returncode == 0
    assert not pid_alive(pid)


def test_restart_loop_is_reported(host):
    """An iperf3 that keeps dying: each run ends healthy, so only the count tells."""
    outputs = []
    for _ in range(5):
        outputs.append(host.run())
        os.kill(host.pid(), signal.SIGKILL)
        wait_until(lambda: not host.daemons())
    for done in outputs[:4]:
        assert_quiet_success(done)
    assert outputs[4].returncode == 0
    assert "restart loop" in outputs[4].stderr
    assert len(outputs[4].stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"\0", b"-5", b"12 34"],
                         ids=["empty", "garbage", "nul", "negative", "two-numbers"])
def test_garbled_pidfile_is_stale(host, content):
    with open(host.pidfile, "wb") as handle:
        handle.write(content)
    assert_quiet_success(host.run())
    assert host.daemons() == [host.pid()]
    assert "stale pidfile" in host.log()


@pytest.mark.parametrize("spelling", [b"%d\0", b"%d\n", b"  %d  \n", b"%d"],
                         ids=["nul", "newline", "spaces", "bare"])
def test_live_daemon_pid_in_any_spelling_is_kept(host, spelling):
    assert_quiet_success(host.run())
    pid = host.pid()
    with open(host.pidfile, "wb") as handle:
        handle.write(spelling % pid)
    assert_quiet_success(host.run())
    assert host.daemons() == [pid]


@pytest.mark.parametrize("parse_case", [
    (b"1234", 1234), (b"1234\0", 1234), (b"1234\n", 1234), (b" 1234 ", 1234),
    (b"", None), (b"abc", None), (b"0", None), (b"12ab", None), (b"\0\0", None),
])
def test_a_pidfile_holds_a_positive_pid_in_any_spelling_or_none(parse_case):
    content, expected = parse_case
    assert iperf_server.parse_pidfile(content) == expected


def test_changed_port_restarts_the_daemon(host):
    """With the pidfile given, a daemon on another port may be another watchdog's: a port
    change stops the old daemon first (with the default files, each port has its own)."""
    assert_quiet_success(host.run())
    old = host.pid()
    new_port = free_port()
    assert_one_line_error(host.run(port=new_port), 1, "--pidfile", "--stop")
    assert host.pid() == old
    assert_quiet_success(host.run("--stop"))
    assert_quiet_success(host.run(port=new_port))
    assert host.pid() != old and not pid_alive(old)
    assert listening(new_port) and not listening(host.port)


def test_changed_extra_argument_restarts_the_daemon(host):
    assert_quiet_success(host.run())
    old = host.pid()
    assert_quiet_success(host.run("--", "--forceflush"))  # an option of every iperf3 3.2+
    new = host.pid()
    assert new != old
    assert "--forceflush" in iperf_server.daemon_argv_of(new, host.pidfile)
    assert_quiet_success(host.run("--", "--forceflush"))
    assert host.pid() == new


def test_daemon_that_lost_its_pidfile_is_replaced(host):
    assert_quiet_success(host.run())
    old = host.pid()
    os.unlink(host.pidfile)
    assert_quiet_success(host.run())
    assert host.daemons() == [host.pid()] and host.pid() != old
    assert "lost its pidfile" in host.log()


def test_pidfile_naming_another_process_while_ours_runs(host):
    assert_quiet_success(host.run())
    old = host.pid()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(host.pidfile, "w") as handle:
            handle.write(str(sleeper.pid))
        assert_quiet_success(host.run())
        assert sleeper.poll() is None
        assert host.daemons() == [host.pid()] and host.pid() not in (old, sleeper.pid)
        assert "lost its pidfile" in host.log()
    finally:
        kill_process(sleeper)


@pytest.mark.slow
def test_stopped_daemon_is_replaced(host):
    assert_quiet_success(host.run())
    old = host.pid()
    os.kill(old, signal.SIGSTOP)
    assert_quiet_success(host.run())
    assert host.pid() != old
    assert not pid_alive(old)
    assert host.daemons() == [host.pid()]
    assert "failed its health probe: stopped (process state T" in host.log()


@pytest.mark.slow
def test_status_says_unhealthy_for_a_hung_daemon(host):
    assert_quiet_success(host.run())
    pid = host.pid()
    os.kill(pid, signal.SIGSTOP)
    done = host.run("--status")
    assert done.returncode == 1, done.stdout
    assert "pid %d" % pid in done.stdout and "probe: stopped" in done.stdout
    assert host.pid() == pid, "--status must not restart anything"


@pytest.mark.slow
def test_a_daemon_that_never_answers_fails_its_probe_and_is_replaced(host, iperf3, tmp_path):
    """A real daemon whose probes go unanswered, as a hung one's would (a real daemon hangs on
    demand only when stopped, and a stopped one is judged by its process state): the first two
    probes wait out PROBE_TIMEOUT; the third, of the daemon that replaced it, measures."""
    wrapper = tmp_path / "bin" / "iperf3"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/bash\n"
        "if [[ \" $* \" == *\" -c \"* ]]; then\n"
        "    echo probe >> %s\n"
        "    [ \"$(wc -l < %s)\" -ge 3 ] || exec sleep 60\n"
        "fi\n"
        "exec -a \"$0\" %s \"$@\"\n" % (tmp_path / "probes", tmp_path / "probes", iperf3))
    wrapper.chmod(0o755)
    assert_quiet_success(host.run("--iperf3", wrapper, "--no-probe"))
    old = host.pid()
    done = host.run("--iperf3", wrapper, "--status")
    assert done.returncode == 1 and "no answer within 5 s" in done.stdout, done.stdout
    assert host.pid() == old
    assert_quiet_success(host.run("--iperf3", wrapper))
    assert host.pid() != old and not pid_alive(old)
    assert host.daemons() == [host.pid()]
    assert "failed its health probe: no answer within 5 s" in host.log()


@pytest.fixture
def busy_server(host, iperf3):
    """The watched daemon, held busy by a long test from another client."""
    assert_quiet_success(host.run())
    clients = [hold_server(iperf3, host.port)]
    probe = iperf_server.Watchdog(iperf3, host.pidfile, host.port, None, [], 1, True).probe
    try:
        assert probe()[0] == "busy"
        host.clients = clients
        yield host
    finally:
        for client in clients:
            kill_process(client)


def test_busy_for_less_than_max_busy_is_kept(busy_server):
    pid = busy_server.pid()
    for _ in range(2):
        assert_quiet_success(busy_server.run("--max-busy", "10"))
    assert busy_server.pid() == pid
    assert "is busy with a test" in busy_server.log()


def age_busy_clock(host, seconds):
    """Move the watchdog's busy clock (busy_since in its state file) `seconds` back: the next
    run sees the server busy for that much longer, with no test waiting for it."""
    state_file = host.pidfile + ".state"
    with open(state_file) as handle:
        state = json.load(handle)
    assert isinstance(state.get("busy_since"), (int, float)), state
    state["busy_since"] -= seconds
    with open(state_file, "w") as handle:
        json.dump(state, handle)


def test_busy_for_longer_than_max_busy_is_restarted(busy_server):
    pid = busy_server.pid()
    assert_quiet_success(busy_server.run("--max-busy", "1"))
    assert busy_server.pid() == pid, "the first busy answer only starts the clock"
    age_busy_clock(busy_server, 61)
    assert_quiet_success(busy_server.run("--max-busy", "1"))
    assert busy_server.pid() != pid
    assert "longer than --max-busy" in busy_server.log()


def test_back_to_back_tests_do_not_add_up_to_max_busy(busy_server, iperf3):
    pid = busy_server.pid()
    assert_quiet_success(busy_server.run("--max-busy", "1"))  # the clock starts
    kill_process(busy_server.clients[0])
    busy_server.clients.append(hold_server(iperf3, busy_server.port))  # the next client's test
    age_busy_clock(busy_server, 61)
    assert_quiet_success(busy_server.run("--max-busy", "1"))
    assert busy_server.pid() == pid, "a new test restarted the clock, it is no stuck server"
    age_busy_clock(busy_server, 61)
    assert_quiet_success(busy_server.run("--max-busy", "1"))
    assert busy_server.pid() != pid, "the same test for longer than --max-busy is stuck"


def test_status_and_stop_exit_codes(host):
    done = host.run("--status")
    assert done.returncode == 3 and "not running" in done.stdout
    assert host.run("--stop").returncode == 0, "stopping nothing is fine"

    assert_quiet_success(host.run())
    pid = host.pid()
    done = host.run("--status")
    assert done.returncode == 0
    assert "pid %d" % pid in done.stdout and "port %d" % host.port in done.stdout
    assert len(done.stdout.splitlines()) == 1
    done = host.run("--status", "--no-probe")
    assert done.returncode == 0 and "last probe" in done.stdout

    assert_quiet_success(host.run("--stop"))
    assert not pid_alive(pid)
    assert not os.path.exists(host.pidfile)
    assert host.run("--status").returncode == 3


def test_missing_executable(host, tmp_path):
    done = host.run("--iperf3", str(tmp_path / "no-such-iperf3"))
    assert_one_line_error(done, 1, "not found", "--iperf3 PATH")


def test_port_held_by_another_listener(host):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", host.port))
        listener.listen()
        done = host.run()
    assert_one_line_error(done, 1, "port %d is in use by another process" % host.port)
    assert host.daemons() == []


def test_default_paths_live_under_home(tmp_path, iperf3):
    home = tmp_path / "home"
    elsewhere = tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    env = {"HOME": str(home)}
    port = free_port()
    pidfile = str(home / ("iperf-%d.pid" % port))  # 5201's keeps iperf.pid (test_watchdog_trust)
    try:
        done = subprocess.run([sys.executable, str(SERVER_SCRIPT), "-p", str(port)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True,
                              cwd=str(elsewhere), env=dict(os.environ, **env), timeout=60)
        assert_quiet_success(done)
        assert os.path.exists(pidfile)
        assert (home / ("iperf_monitor-%d.log" % port)).exists()
        assert os.listdir(str(elsewhere)) == []
    finally:
        for pid in iperf_server.our_daemons(pidfile):
            kill_pid(pid)


@pytest.mark.parametrize("args,fragment", [
    (["--max-busy", "-1"], "--max-busy"),
    (["--max-busy", "soon"], "--max-busy"),
    (["--port", "0"], "--port"),
    (["--port", "http"], "--port"),
    (["--status", "--stop"], "not allowed with"),
    (["--", "-p", "5999"], "-p cannot be passed"),
    (["--", "--pidfile=/tmp/x"], "--pidfile cannot be passed"),
    (["--", "-s"], "-s cannot be passed"),
    (["--", "--po", "5999"], "--port cannot be passed"),
    (["--", "--pidf", "/tmp/x"], "--pidfile cannot be passed"),
    (["--", "-VsD"], "-s cannot be passed"),
    (["--", "-1"], "-1 cannot be passed"),
    (["--no-such-flag"], "unrecognized"),
])
def test_bad_usage_exits_2_without_traceback(host, args, fragment):
    done = host.run(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert fragment in done.stderr
    assert host.daemons() == []
    assert not os.path.exists(host.pidfile)


def test_unwritable_log_file_is_named(host, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = run_script(SERVER_SCRIPT, ["--pidfile", host.pidfile, "--log-file",
                                      str(blocker / "log"), "-p", str(host.port)])
    assert_one_line_error(done, 1, str(blocker / "log"))
    assert host.daemons() == []


def test_pidfile_in_an_impossible_folder_is_named(host, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    pidfile = blocker / "sub" / "iperf.pid"
    done = run_script(SERVER_SCRIPT, ["--pidfile", pidfile, "--log-file", host.log_file,
                                      "-p", str(host.port)])
    assert_one_line_error(done, 1, str(blocker / "sub"))
    assert iperf_server.our_daemons(str(pidfile)) == []


def test_refused_argument_reports_iperf3s_reason(host):
    done = host.run("--", "--bogus-flag")
    assert_one_line_error(done, 1, "iperf3 failed to start", "--bogus-flag")
    assert host.daemons() == []


def test_failing_daemon_start_reports_iperf3s_words(host, fake_iperf3):
    fake = fake_iperf3("""
        sys.stderr.write("iperf3: parameter error - some option is not supported\\n")
        sys.exit(1)
    """)
    done = host.run("--iperf3", str(fake))
    assert_one_line_error(done, 1, "iperf3 failed to start", "not supported")


def test_a_daemon_that_dies_after_forking_is_reported_without_waiting(host, fake_iperf3):
    """Like iperf3 with a --logfile it cannot open: the -D parent exits 0 in silence and its
    child dies a moment later. Seen gone, it is reported as such, not after START_TIMEOUT as
    "did not come up" (a --version run answers first, as a real iperf3's would)."""
    fake = fake_iperf3("""
        if "--version" in args:
            print("iperf 3.12 (cJSON 1.7.15)")
            sys.exit(0)
        if os.fork() == 0:  # the daemon: it lives a moment, with iperf3's command line
            time.sleep(0.3)
            os._exit(1)
        sys.exit(0)
    """)
    done = host.run("--iperf3", str(fake), "--no-probe")
    assert_one_line_error(done, 1, "iperf3 exited before it listened on port %d" % host.port,
                          "pass -- --logfile")
    assert host.daemons() == []


def test_main_in_process_returns_2_for_owned_options(capsys):
    assert iperf_server.main(["--", "--daemon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--daemon" in err


FIGURES = ('{"end": {"sum_sent": {"bits_per_second": 8e6}, '
           '"sum_received": {"bits_per_second": 8e6}}}')


@pytest.mark.parametrize("outcome,authenticating,verdict", [
    ((0, FIGURES, ""), False, "ok"),
    # 3.9: server down, busy or login refused all print an empty "end" and no "error".
    ((1, '{"start": {}, "end": {}}', "iperf3: error - unable to send control message: "
      "Bad file descriptor\n"), False, "fail"),
    ((0, '{"start": {}, "end": {}}', ""), False, "fail"),
    ((0, '{"error": "the server is busy running a test. try again later"}', ""), False, "busy"),
    ((1, '{"end": {}}', "iperf3: error - the server is busy running a test. try again later"),
     False, "busy"),
    ((1, 'warning\n{"error": "test authorization failed"}\n', ""), False, "ok"),
    ((1, '{"error": "error - test authorization failed"}', ""), True, "ok"),  # 3.7
    ((1, '{"end": {}}', "iperf3: error - test authorization failed\n"), True, "ok"),  # 3.9
    # 3.21 refuses a login by closing the connection: an answer only from an auth server.
    ((1, '{"error": "control socket has closed unexpectedly"}', ""), True, "ok"),
    ((1, '{"error": "control socket has closed unexpectedly"}', ""), False, "fail"),
    ((0, '{"error": "unable to connect to server: Connection refused"}', ""), True, "fail"),
    ((-9, "", ""), False, "fail"),
    ((0, '{"start": {', ""), False, "fail"),
])
def test_probe_verdict_needs_figures_and_knows_each_versions_refusal(outcome, authenticating,
                                                                     verdict):
    assert iperf_server.classify_probe(*outcome, False, authenticating)[0] == verdict


def test_probe_that_timed_out_is_a_failure():
    assert iperf_server.classify_probe(None, "", "", True)[0] == "fail"


@pytest.mark.parametrize("version,extra,guards", [
    (None, [], ["--json"]),
    ((3, 9), [], ["--json"]),
    ((3, 12), [], ["--snd-timeout", "30000", "--json"]),
    ((3, 21), [], ["--snd-timeout", "30000", "--json"]),
    ((3, 21), ["--snd-timeout", "5000"], ["--json"]),
    ((3, 21), ["--snd=5000", "-J"], []),
    ((3, 21), ["--logfile", "/tmp/iperf3.log"], ["--snd-timeout", "30000"]),
    ((3, 9), ["-1J"], []),
    ((3, 18), ["--json-stream"], ["--snd-timeout", "30000"]),
    ((3, 21), ["-BJupiter.example"], ["--snd-timeout", "30000", "--json"]),  # a value, no -J
])
def test_guards_only_where_the_version_has_them(version, extra, guards):
    assert iperf_server.guard_args(version, extra) == guards


def test_guards_added_by_version_are_not_settings():
    wanted = iperf_server.daemon_argv("/usr/bin/iperf3", "/p", 5201, None, [])
    assert iperf_server.same_command(wanted, wanted)
    assert iperf_server.same_command(wanted + ["--snd-timeout", "30000"], wanted)
    assert iperf_server.same_command(wanted + ["--snd-timeout", "30000", "--json"], wanted)
    assert iperf_server.same_command(wanted + ["--json"], wanted)
    assert not iperf_server.same_command(wanted + ["--json", "-1"], wanted)
    assert not iperf_server.same_command(wanted + ["--snd-timeout"], wanted)
    assert not iperf_server.same_command(wanted + ["--snd-timeout"], wanted)
    assert not iperf_server.same_command(wanted + ["-V"], wanted)
    assert not iperf_server.same_command(wanted[:-1] + ["5202"], wanted)


@pytest.mark.parametrize("text,version", [
    ("iperf 3.12 (cJSON 1.7.15)\nLinux ...", (3, 12)),
    ("iperf 3.1.3\n", (3, 1, 3)),
    ("iperf 3.21+ (cJSON 1.7.15)", (3, 21)),
    ("usage: something else", None),
])
def test_version_is_read_from_the_banner(text, version):
    assert iperf_server.parse_version(text) == version


def test_arguments_after_the_double_dash_add_to_the_setting(monkeypatch):
    """As in iperf_client.py: IPERF_EXTRA_ARGS holds what every run needs, `--` adds to it."""
    monkeypatch.setattr(iperf_server, "IPERF_EXTRA_ARGS", ["--forceflush"])
    ours, extra = iperf_server.split_extra(["-p", "1", "--", "-V"])
    assert (ours, extra) == (["-p", "1"], ["--forceflush", "-V"])
    assert iperf_server.split_extra(["-p", "1"]) == (["-p", "1"], ["--forceflush"])


# --- the server changes settings without losing the server ----------------------------------------

def test_a_new_port_that_is_taken_keeps_the_working_daemon(host):
    assert_quiet_success(host.run())
    pid = host.pid()
    taken = free_port()
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", taken))
    blocker.listen(1)
    try:
        done = host.run(port=taken)
    finally:
        blocker.close()
    # With the same pidfile, the daemon on another port is refused first as another
    # watchdog's (test_changed_port_restarts_the_daemon).
    assert_one_line_error(done, 1, "another watchdog", "left alone")
    assert host.daemons() == [pid] and host.pid() == pid


def test_an_unwritable_state_file_is_a_warning_not_a_failed_run(host):
    assert_quiet_success(host.run())
    os.mkdir(host.pidfile + ".state.d")
    os.unlink(host.pidfile + ".state")
    os.rename(host.pidfile + ".state.d", host.pidfile + ".state")  # a directory: unwritable
    done = host.run()
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "untracked" in host.log()


def test_the_server_log_never_follows_a_planted_symlink(host, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    os.symlink(str(target), host.log_file)
    done = host.run()
    assert_one_line_error(done, 1, host.log_file)
    assert target.read_text() == "precious\n"
