"""Tests of iperf_client.py: real iperf3 on random loopback ports for what a real one can show,
fake iperf3 executables for hangs, crashes and noise, main([...]) in-process for arguments."""

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (
    CANNOT_CONNECT, CLIENT_SCRIPT, FAKE_RESULT, LEDGER_COLUMNS, SAYS_BUSY, assert_one_line_error,
    free_port, kill_process, paced, pids_with, read_ledger, run_script, says, wait_until,
)

import iperf_client
import iperf_server

TS_RE = r"\d{8}_\d{6}"


# --- helpers ------------------------------------------------------------------------------------

def named(row):
    """A ledger row (a list in LEDGER_COLUMNS order) as a dict, for assertions by name."""
    return dict(zip(LEDGER_COLUMNS, row))


def read_json(path):
    with open(str(path)) as handle:
        return json.load(handle)


def names(folder):
    return sorted(os.listdir(str(folder)))


def no_temp_files(folder):
    return [name for name in names(folder) if name.endswith(".tmp")]


def client_args(port, folder, *more):
    args = ["--server", "127.0.0.1", "--port", port, "-t", "1", "-P", "2", "-d", folder,
            "--timeout-margin", "5", "--busy-wait", "0", *more]
    return paced(args)


def assert_clean(proc):
    assert "Traceback" not in proc.stderr
    assert "Traceback" not in proc.stdout


# --- end to end with a real iperf3 ----------------------------------------------------------------

@pytest.fixture
def server(iperf3_server):
    """A real iperf3 server on a random loopback port (conftest waits for it passively: a
    connection made just to see the port open would make iperf3 reset the next client)."""
    return iperf3_server


def test_good_run_writes_both_results_and_prints_nothing(server, tmp_path):
    folder = tmp_path / "results"
    proc = run_script(CLIENT_SCRIPT, client_args(server.port, folder, "--prefix", "lab-1."))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    files = [n for n in names(folder) if n not in ("results.csv", ".lock", ".ledger.lock")]
    assert len(files) == 3
    ts = re.match(r"lab-1\.(%s)_client\.json$" % TS_RE, files[0]).group(1)
    assert files == ["lab-1.%s%s" % (ts, s) for s in
                     ("_client.json", "_iperf_mon.log", "_server.json")]
    forward = read_json(folder / files[0])
    reverse = read_json(folder / files[2])
    assert forward["start"]["test_start"]["reverse"] == 0
    assert reverse["start"]["test_start"]["reverse"] == 1
    for doc, direction in ((forward, "forward"), (reverse, "reverse")):
        assert "error" not in doc
        assert doc["start"]["test_start"]["num_streams"] == 2
        assert doc["start"]["test_start"]["duration"] == 1
        meta = doc["continuous_iperf"]
        assert meta["direction"] == direction
        assert (meta["server"], meta["port"], meta["streams"], meta["duration"]) == (
            "127.0.0.1", server.port, 2, 1)
        assert meta["attempts"] == 1 and meta["exit_code"] == 0 and meta["run"] == ts
        assert ("-R" in meta["command"].split()) == (direction == "reverse")
    rows = read_ledger(folder)
    assert [r["direction"] for r in rows] == ["forward", "reverse"]
    for row, doc, name in zip(rows, (forward, reverse), (files[0], files[2])):
        end = doc["end"]
        assert float(row["sent_bps"]) == end["sum_sent"]["bits_per_second"]
        assert float(row["received_bps"]) == end["sum_received"]["bits_per_second"]
        assert int(row["retransmits"]) == end["sum_sent"]["retransmits"]
        assert float(row["received_bps"]) > 0
        assert (row["status"], row["error"], row["file"], row["run"], row["prefix"]) == (
            "ok", "", name, ts, "lab-1.")
        assert (row["server"], row["port"], row["streams"], row["duration"], row["attempts"]) == (
            "127.0.0.1", str(server.port), "2", "1", "1")
        assert row["timestamp"] == iperf_client.iso_time(doc["start"]["timestamp"]["timesecs"])
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$", row["timestamp"])
    log_text = (folder / files[1]).read_text()
    assert "running: " in log_text and " -R" in log_text


def test_server_down_records_both_errors(iperf3, tmp_path):
    folder = tmp_path / "r"
    proc = run_script(CLIENT_SCRIPT, client_args(free_port(), folder))
    assert_clean(proc)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 2
    assert "forward" in lines[0] and "reverse" in lines[1]
    assert all(says(line, CANNOT_CONNECT) for line in lines)
    rows = read_ledger(folder)
    assert [(r["direction"], r["status"], r["attempts"]) for r in rows] == [
        ("forward", "error", "2"), ("reverse", "error", "2")]
    for row in rows:
        doc = read_json(folder / row["file"])
        assert says(doc["error"], CANNOT_CONNECT) and doc["error"] == row["error"]
        assert row["sent_bps"] == row["received_bps"] == ""
        assert row["timestamp"] == iperf_client.iso_time(doc["continuous_iperf"]["start"])
    log_text = next(folder.glob("*_iperf_mon.log")).read_text()
    assert log_text.count("attempt 2 failed") == 2


def start_holder(iperf3, port, seconds):
    """Another client occupying the server; returns once its test runs (a few tries)."""
    said = []
    for _ in range(5):
        holder = subprocess.Popen(
            [iperf3, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "--forceflush"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True)
        for line in holder.stdout:
            said.append(line)
            if "connected" in line and "local" in line:
                return holder
        kill_process(holder)
        time.sleep(0.5)
    raise AssertionError("holder client did not start: %r" % said)


@pytest.mark.slow
def test_busy_server_is_waited_out(iperf3, server, tmp_path):
    holder = start_holder(iperf3, server.port, 60)
    try:
        args = client_args(server.port, tmp_path, "--retries", "0")
        args[args.index("--busy-wait") + 1] = "4"
        client = subprocess.Popen([sys.executable, str(CLIENT_SCRIPT), *args],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True)
        try:
            # The other client's test ends once ours has found the server busy (its log says
            # so), however long a loaded machine took to start it; ours retries at its
            # --busy-wait.
            assert wait_until(lambda: "server busy" in "".join(
                path.read_text() for path in tmp_path.glob("*_iperf_mon.log")), timeout=30)
            kill_process(holder)
            out, err = client.communicate(timeout=60)
        finally:
            kill_process(client)
    finally:
        kill_process(holder)
    assert "Traceback" not in err
    assert (client.returncode, out, err) == (0, "", "")
    rows = read_ledger(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert int(rows[0]["attempts"]) >= 2  # busy retries do not count against --retries 0
    assert "server busy" in next(tmp_path.glob("*_iperf_mon.log")).read_text()


@pytest.mark.slow
def test_busy_server_gives_up_after_busy_wait(iperf3, server, tmp_path):
    holder = start_holder(iperf3, server.port, 60)  # busy for all of the run, however slow
    try:
        args = client_args(server.port, tmp_path, "--retries", "0")
        args[args.index("--busy-wait") + 1] = "0.5"
        proc = run_script(CLIENT_SCRIPT, args)
    finally:
        kill_process(holder)
    assert_clean(proc)
    assert proc.returncode == 1, proc.stderr
    rows = read_ledger(tmp_path)
    log_text = next(tmp_path.glob("*_iperf_mon.log")).read_text()
    assert all(says(r["error"], SAYS_BUSY) and r["attempts"] == "2" for r in rows), (
        rows, log_text)
    assert len(proc.stderr.splitlines()) == 2, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_mid_test_keeps_partial_result(server, tmp_path, signame):
    signum = getattr(signal, signame)
    port = str(server.port)
    script = subprocess.Popen(
        [sys.executable, str(CLIENT_SCRIPT), *client_args(port, tmp_path, "-t", "20")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True)
    try:
        # Signalled once both streams send (the control connection and two more on the
        # server's port) and have measured a little: the -t 20 is never waited out.
        assert wait_until(lambda: len(iperf_server.established_peers(server.port)) >= 3,
                          timeout=10)
        time.sleep(0.3)
        script.send_signal(signum)
        out, err = script.communicate(timeout=20)
    finally:
        kill_process(script)
    assert "Traceback" not in err
    assert script.returncode == 128 + signum
    assert wait_until(lambda: not pids_with("-c", "127.0.0.1", "-p", port), timeout=5)
    assert no_temp_files(tmp_path) == []
    rows = read_ledger(tmp_path)
    assert [(r["direction"], r["status"]) for r in rows] == [("forward", "error")]
    assert rows[0]["error"].startswith("interrupted by %s" % signame)
    assert not list(tmp_path.glob("*_server.json"))  # the reverse test never started
    doc = read_json(tmp_path / rows[0]["file"])
    # The ledger's cell is the message on one line, its white space folded (3.21 writes "from
    # socket:  by signal" with two spaces).
    assert " ".join(doc["error"].split()) == rows[0]["error"]
    assert doc["end"]["sum_sent"]["bits_per_second"] > 0  # what was measured is kept
    assert float(rows[0]["sent_bps"]) == doc["end"]["sum_sent"]["bits_per_second"]


@pytest.mark.slow
def test_a_run_that_cannot_have_the_folder_is_recorded_as_skipped_and_exits_75(server, tmp_path):
    first = subprocess.Popen(
        [sys.executable, str(CLIENT_SCRIPT),
         *client_args(server.port, tmp_path, "--timeout-margin", "60")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True)
    try:
        assert wait_until(lambda: list(tmp_path.glob("*_iperf_mon.log")), timeout=10)
        # Stopped while the second run tries: it keeps the folder's lock and writes no file of
        # its own meanwhile, however long the second run takes on a loaded machine (its
        # iperf3's hard limit is far enough).
        first.send_signal(signal.SIGSTOP)
        before = names(tmp_path)
        second = run_script(CLIENT_SCRIPT,
                            client_args(server.port, tmp_path, "--lock-wait", "0.5"))
        after = names(tmp_path)
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=30)
    finally:
        kill_process(first)
    assert_clean(second)
    assert second.returncode == 75
    assert len(second.stderr.splitlines()) == 1 and "another run" in second.stderr
    assert "skipped" in second.stderr
    assert not [n for n in after if n not in before and n.endswith((".log", ".tmp", ".json"))]
    assert (first.returncode, out, err) == (0, "", "")
    rows = read_ledger(tmp_path)
    assert sorted(r["status"] for r in rows) == ["ok", "ok", "skipped", "skipped"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["direction"] for r in skipped} == {"forward", "reverse"}
    assert all(r["file"] == "" and "another run" in r["error"] for r in skipped)
    assert len(list(tmp_path.glob("*_iperf_mon.log"))) == 1


# --- fake iperf3: hang, noise, crash --------------------------------------------------------------

HANG = """
# Like a stuck iperf3: measures forever; SIGTERM prints partial JSON. A child shares the group.
marker = args[-1]
def on_term(signum, frame):
    print(json.dumps({"start": {}, "intervals": [], "end": {},
                      "error": "interrupt - the client has terminated"}))
    sys.exit(1)
signal.signal(signal.SIGTERM, on_term)
if os.fork() == 0:
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", marker])
time.sleep(300)
"""


@pytest.mark.slow
def test_hung_iperf3_is_stopped_at_the_hard_limit(fake_iperf3, tmp_path):
    fake = fake_iperf3(HANG)
    marker = "hang-marker-%d" % os.getpid()
    started = time.monotonic()
    proc = run_script(CLIENT_SCRIPT, ["-c", "127.0.0.1", "-t", "1", "-d", tmp_path,
                                      "--timeout-margin", "1", "--retries", "0",
                                      "--iperf3", fake, "--", marker], timeout=60)
    elapsed = time.monotonic() - started
    assert_clean(proc)
    assert proc.returncode == 1
    assert elapsed < 2 * (2 + iperf_client.KILL_GRACE) + 10
    assert wait_until(lambda: not pids_with(marker), timeout=5)
    rows = read_ledger(tmp_path)
    assert len(rows) == 2
    for row in rows:
        assert row["error"] == "timed out after 2 s; interrupt - the client has terminated"
        assert read_json(tmp_path / row["file"])["error"] == row["error"]


def test_run_command_kills_what_ignores_sigterm(fake_iperf3):
    marker = "stubborn-marker-%d" % os.getpid()
    fake = fake_iperf3("""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)",
                                      args[0]])
        print("{", flush=True)
        time.sleep(300)
    """)
    result = iperf_client.run_command([fake, marker], limit=0.5, grace=0.5)
    assert result.timed_out == 0.5
    assert result.returncode == -signal.SIGKILL
    assert wait_until(lambda: not pids_with(marker), timeout=5)
    doc = iperf_client.result_document(result.stdout, result.stderr, result.returncode,
                                       result.timed_out)
    assert doc["error"] == ("timed out after 0.5 s; "
                            "iperf3 printed an incomplete JSON result (exit code -9)")


def test_noise_around_the_json_is_ignored(fake_iperf3, tmp_path):
    fake = fake_iperf3(FAKE_RESULT + """
print("warning: something {odd} happened")
print(json.dumps(doc, indent=4))
print("iperf3: error - trailing text")
""")
    proc = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", tmp_path, "--iperf3", fake])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    rows = read_ledger(tmp_path)
    assert [(r["sent_bps"], r["received_bps"], r["retransmits"]) for r in rows] == [
        ("1000.5", "900.25", "3"), ("1001.5", "901.25", "3")]
    doc = read_json(tmp_path / rows[1]["file"])
    meta = doc.pop("continuous_iperf")
    assert meta["direction"] == "reverse"
    assert doc["end"]["sum_received"] == {"bits_per_second": 901.25}
    assert list(doc) == ["start", "intervals", "end"]  # iperf3's keys untouched


@pytest.mark.parametrize("body, expected", [
    ("os.kill(os.getpid(), signal.SIGSEGV)", "iperf3 printed no JSON result (exit code -11)"),
    ("print('{\"start\": {\"connected\": ['); sys.exit(1)",
     "iperf3 printed an incomplete JSON result (exit code 1)"),
    ("sys.stderr.write('iperf3: parameter error - bad\\n'); sys.exit(1)",
     "iperf3 printed no JSON result (exit code 1): iperf3: parameter error - bad"),
    ("print(json.dumps({'error': 'boom', 'start': {}, 'end': {}}))", "boom"),
])
def test_crash_or_failure_is_recorded_as_json(fake_iperf3, tmp_path, body, expected):
    proc = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", tmp_path,
                                      "--iperf3", fake_iperf3(body)])
    assert_clean(proc)
    assert proc.returncode == 1
    assert [line.split(": ", 2)[2].split()[0] for line in proc.stderr.splitlines()] == [
        "forward", "reverse"]
    rows = read_ledger(tmp_path)
    assert [(r["status"], r["attempts"]) for r in rows] == [("error", "2"), ("error", "2")]
    for row in rows:
        doc = read_json(tmp_path / row["file"])
        assert doc["error"] == expected == row["error"]
        assert doc["continuous_iperf"]["attempts"] == 2
        # Metadata first, "error" last: what the ledger's rebuild relies on.
        assert list(doc)[0] == "continuous_iperf" and list(doc)[-1] == "error"


def test_missing_iperf3_is_recorded(tmp_path):
    proc = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", tmp_path, "--retries", "0",
                                      "--iperf3", tmp_path / "no-such-iperf3"])
    assert_clean(proc)
    assert proc.returncode == 1
    rows = read_ledger(tmp_path)
    assert len(rows) == 2
    assert all(r["error"].startswith("cannot run ") and "No such file" in r["error"]
               for r in rows)


def test_failed_attempt_is_retried_and_file_holds_the_last(fake_iperf3, tmp_path):
    state = tmp_path / "state"
    fake = fake_iperf3(FAKE_RESULT + """
state = %r
if not os.path.exists(state):
    open(state, "w").close()
    print(json.dumps({"start": {}, "end": {}, "error": "first attempt fails"}))
else:
    print(json.dumps(doc))
""" % str(state))
    folder = tmp_path / "r"
    proc = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", folder, "--iperf3", fake,
                                      "--jitter", "0.2"])
    assert (proc.returncode, proc.stderr) == (0, "")
    rows = read_ledger(folder)
    assert [(r["status"], r["attempts"]) for r in rows] == [("ok", "2"), ("ok", "1")]
    log_text = next(folder.glob("*_iperf_mon.log")).read_text()
    assert "first attempt fails" in log_text and "jitter" in log_text
    assert "error" not in read_json(folder / rows[0]["file"])


def test_fast_runs_in_one_second_do_not_overwrite(fake_iperf3, tmp_path):
    fake = fake_iperf3("sys.exit(1)")
    for _ in range(2):
        assert run_script(CLIENT_SCRIPT, ["-c", "h", "-d", tmp_path, "--retries", "0",
                                          "--iperf3", fake]).returncode == 1
    rows = read_ledger(tmp_path)
    assert len(rows) == 4 and len({r["file"] for r in rows}) == 4
    assert len(list(tmp_path.glob("*_iperf_mon.log"))) == 2


@pytest.mark.slow
def test_progress_line_only_on_a_terminal(fake_iperf3, tmp_path):
    fake = fake_iperf3(FAKE_RESULT + "time.sleep(1.2)\nprint(json.dumps(doc))")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, str(CLIENT_SCRIPT), "-c", "h", "-t", "3", "-d", tmp_path / "a",
             "--iperf3", fake], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=30)
    finally:
        os.close(master)
    shown = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert "\rforward: 1/3 s" in shown and "\rreverse: 1/3 s" in shown
    quiet = run_script(CLIENT_SCRIPT, ["-c", "h", "-t", "3", "-d", tmp_path / "b",
                                       "--iperf3", fake])
    assert (quiet.returncode, quiet.stderr) == (0, "")


# --- arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["-c", "h", "-t", "0"], "whole number of seconds"),
    (["-c", "h", "-t", "1.5"], "whole number of seconds"),
    (["-c", "h", "-t", "-3"], "whole number of seconds"),
    (["-c", "h", "--duration", "abc"], "whole number of seconds"),
    (["-c", "h", "-P", "0"], "1 to 128"),
    (["-c", "h", "-P", "129"], "1 to 128"),
    (["-c", "h", "--streams", "2.5"], "1 to 128"),
    (["-c", "h", "--prefix", "a/b"], "letters, digits"),
    (["-c", "h", "--prefix", "a b"], "letters, digits"),
    (["-c", "h", "--prefix", "../x"], "letters, digits"),
    (["--server=-evil"], "not a host name"),
    (["--server", ""], "--server"),
    ([], "--server"),
    (["-c", "CHANGE_TO_IP"], "--server"),
    (["-c", "h", "-p", "0"], "port"),
    (["-c", "h", "-p", "70000"], "port"),
    (["-c", "h", "--retries", "-1"], ">= 0"),
    (["-c", "h", "--busy-wait", "-5"], ">= 0"),
    (["-c", "h", "--jitter", "nan"], ">= 0"),
    (["-c", "h", "--timeout-margin", "x"], ">= 1"),
    (["-c", "h", "--timeout-margin", "0"], ">= 1"),
    (["-c", "h", "--no-such-flag"], "unrecognized"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    folder = tmp_path / "results"
    assert iperf_client.main(args + ["-d", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and message in err
    assert not folder.exists()


def test_bad_input_as_cron_runs_it(tmp_path):
    proc = run_script(CLIENT_SCRIPT, ["-c", "h", "-t", "0.5", "-d", tmp_path / "r"])
    assert_clean(proc)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "r").exists()


OWNED = [["-t5"], ["-t", "5"], ["--time=5"], ["--time", "5"], ["-R"], ["--reverse"], ["-J"],
         ["--json"], ["--json-stream"], ["--logfile", "x"], ["--logfile=x"], ["-c", "h2"],
         ["-ch2"], ["--client", "h2"], ["-p", "1"], ["--port=1"], ["-P", "3"], ["-P3"],
         ["--parallel", "3"], ["-ZR"], ["--rev"], ["-Z", "-O", "1", "-J"], ["--bidir"],
         ["-n", "1M"], ["--bytes=1M"], ["-k", "10"], ["--blockcount", "10"], ["-Zn1M"]]


@pytest.mark.parametrize("extra", OWNED)
def test_owned_iperf3_options_are_refused(tmp_path, capsys, extra):
    folder = tmp_path / "results"
    assert iperf_client.main(["-c", "h", "-d", str(folder), "--"] + extra) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "set or ruled out by this script" in err
    assert not folder.exists()


@pytest.mark.parametrize("extra", [
    ["-Z"], ["-O", "2"], ["-O2"], ["-B", "127.0.0.1"], ["-B", "-c"], ["-C", "cubic"],
    ["--bind-dev", "lo"], ["-4", "-Z"], ["--omit=1"], ["-w", "1M"],
])
def test_other_iperf3_options_are_passed_unchanged(capsys, extra):
    assert iperf_client.main(["-c", "h", "--dry-run", "--"] + extra) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all(line.split()[-len(extra):] == extra for line in lines)


def test_dry_run_prints_two_commands_and_runs_nothing(fake_iperf3, tmp_path, capsys):
    marker = tmp_path / "ran"
    fake = fake_iperf3("open(%r, 'w').close()" % str(marker))
    folder = tmp_path / "results"
    assert iperf_client.main(["-c", "192.0.2.1", "-p", "5300", "-t", "7", "-P", "3",
                              "-d", str(folder), "--iperf3", str(fake), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        "%s -c 192.0.2.1 -p 5300 -t 7 -P 3 -J" % fake,
        "%s -c 192.0.2.1 -p 5300 -t 7 -P 3 -J -R --get-server-output" % fake,
    ]
    assert not marker.exists() and not folder.exists()


def test_defaults_come_from_the_settings(capsys):
    assert iperf_client.main(["-c", "h", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "iperf3 -c h -p 5201 -t 60 -P 30 -J"
    parser = iperf_client.build_parser()
    options = parser.parse_args([])
    assert (options.server, options.targets, options.duration, options.streams,
            options.retries) == (None, None, 60, 30, 1)
    with pytest.raises(ValueError, match="no server configured"):
        iperf_client.resolve_targets(options)  # IPERF_SERVER, the placeholder
    assert (options.busy_wait, options.jitter, options.timeout_margin, options.prefix) == (
        120, 0, 30, "")
    assert options.results_dir == os.path.join(os.path.expanduser("~"), "iperf_results")


def test_flags_never_rewrite_the_settings(capsys):
    """A run with other flags leaves the module's settings as the admin wrote them."""
    assert iperf_client.main(["-c", "h", "-t", "5", "-P", "2", "-p", "5202", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "iperf3 -c h -p 5202 -t 5 -P 2 -J"
    assert (iperf_client.IPERF_SERVER, iperf_client.TEST_DURATION, iperf_client.NUMBER_STREAMS,
            iperf_client.IPERF_PORT) == ("CHANGE_TO_IP", 60, 30, 5201)


def test_version_prints_the_programs_name_and_version(capsys):
    assert iperf_client.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "iperf_client.py " + iperf_client.__version__


# --- pure helpers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ('warning: x\n{"a": 1}\niperf3: error - y\n', {"a": 1}),
    ('note {braces}\n{"a": {"b": [1, 2]}}\n', {"a": {"b": [1, 2]}}),
    ('{"a": 1}{"b": 2}', {"a": 1}),
    ('{"a": ', None),
    ("", None),
    ("plain text", None),
    ("[1, 2]", None),
])
def test_parse_json_output(text, expected):
    assert iperf_client.parse_json_output(text) == expected


@pytest.mark.parametrize("args, expected", [
    (["-O", "3"], 3), (["-O3"], 3), (["--omit", "2"], 2), (["--omit=4"], 4), (["-Z"], 0),
    ([], 0), (["-O", "x"], 0), (["-ZO2"], 2), (["-Z", "-O", "5"], 5), (["-B", "h", "-i1"], 0),
])
def test_omit_extends_the_hard_limit(args, expected):
    assert iperf_client.omit_seconds(args) == expected


def test_ledger_row_from_a_known_document():
    doc = {"continuous_iperf": {"run": "20240101_000000", "prefix": "p", "direction": "reverse",
                                "server": "s", "port": 5201, "streams": 4, "duration": 10,
                                "attempts": 3, "start": 1704067200.5},
           "start": {"timestamp": {"timesecs": 1704067201}},
           "end": {"sum_sent": {"bits_per_second": 1.25e9, "retransmits": 0},
                   "sum_received": {"bits_per_second": 123456789.123}},
           "error": "a\nmulti-line,  error"}
    row = iperf_client.ledger_row(doc, "p20240101_000000_server.json")
    assert len(row) == len(LEDGER_COLUMNS) and all(isinstance(cell, str) for cell in row)
    expected = {
        "timestamp": iperf_client.iso_time(1704067201), "run": "20240101_000000",
        "prefix": "p", "direction": "reverse", "server": "s", "port": "5201", "streams": "4",
        "duration": "10", "status": "error", "error": "a multi-line, error",
        "sent_bps": "1250000000.0", "received_bps": "123456789.123", "retransmits": "0",
        "attempts": "3", "file": "p20240101_000000_server.json", "client": "", "label": "",
        "protocol": "", "min_rtt_ms": "", "mean_rtt_ms": "", "jitter_ms": "", "lost_percent": "",
        "lost_packets": "", "packets": ""}
    assert list(expected) == LEDGER_COLUMNS  # the ledger's format: its names, in this order
    assert named(row) == expected


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")
    iperf_client.write_atomic(str(target), b"new")
    assert target.read_text() == "new"

    def broken_fsync(fd):
        raise OSError(5, "I/O error")
    monkeypatch.setattr(iperf_client.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        iperf_client.write_atomic(str(target), b"newer")
    assert target.read_text() == "new"
    assert names(tmp_path) == ["x.json"]


# --- verdicts that hold on every iperf3 ---------------------------------------------------------

EMPTY_END_39 = ('{"start": {"connected": [], "version": "iperf 3.9"}, "intervals": [], '
                '"end": {}}\n')


@pytest.mark.parametrize("stdout,stderr,returncode,error", [
    # 3.9, server down: no "error" key, the reason on stderr only.
    (EMPTY_END_39, "iperf3: error - unable to send control message: Bad file descriptor\n", 1,
     "unable to send control message: Bad file descriptor"),
    (EMPTY_END_39, "", 0, "iperf3 reported no result (exit 0)"),
    (EMPTY_END_39, "", None, "iperf3 reported no result (exit ?)"),
    # 3.12 exits 0 on errors: the JSON's own message wins, stderr adds nothing.
    ('{"error": "unable to connect to server: Connection refused"}', "", 0,
     "unable to connect to server: Connection refused"),
    # 3.7 prefixes its messages.
    ('{"error": "error - test authorization failed", "end": {}}', "", 1,
     "error - test authorization failed"),
])
def test_a_result_without_figures_is_an_error_with_iperf3s_own_words(stdout, stderr,
                                                                     returncode, error):
    doc = iperf_client.result_document(stdout, stderr, returncode)
    assert doc["error"] == error
    row = named(iperf_client.ledger_row(doc, "20240101_000000_client.json"))
    assert (row["status"], row["error"], row["sent_bps"]) == ("error", error, "")


def test_an_old_file_without_figures_or_error_is_rebuilt_as_an_error():
    """Files written before this check (3.9 runs recorded as ok) tell the truth on --rebuild."""
    doc = json.loads(EMPTY_END_39)
    doc["continuous_iperf"] = {"exit_code": 1, "direction": "forward"}
    row = named(iperf_client.ledger_row(doc, "20240101_000000_client.json"))
    assert (row["status"], row["error"]) == ("error", "iperf3 reported no result (exit 1)")


def test_a_udp_result_of_an_old_iperf3_has_its_one_sum_as_figures():
    doc = {"start": {"test_start": {"protocol": "UDP"}},
           "end": {"sum": {"bits_per_second": 1e6, "lost_percent": 0.5}}}
    row = named(iperf_client.ledger_row(iperf_client.result_document(json.dumps(doc), "", 0),
                                        "f"))
    figures = (row["status"], row["sent_bps"], row["received_bps"])
    assert figures == ("ok", "1000000.0", "1000000.0")


@pytest.mark.parametrize("error,version,busy", [
    ("the server is busy running a test. try again later", (3, 12), True),
    ("error - the server is busy running a test. try again later", (3, 7), True),
    ("unable to send control message: Connection reset by peer", (3, 9), True),
    ("unable to send control message: Connection reset by peer", (3, 12), False),
    ("unable to send control message: Connection reset by peer", None, False),
    ("unable to connect to server: Connection refused", (3, 9), False),
])
def test_busy_in_each_versions_words(error, version, busy):
    assert iperf_client.is_busy({"error": error}, version) is busy


@pytest.mark.parametrize("error,stderr,version,logged_in,fragments", [
    ("test authorization failed", "", (3, 12), True,
     ["login refused", "password", "clock", "--legacy-clients"]),
    ("error - test authorization failed", "", (3, 7), True, ["login refused", "--legacy-clients"]),
    # A 3.21 server refuses by closing the connection; a 3.21 client fails on old servers.
    ("control socket has closed unexpectedly", "", (3, 21), True,
     ["login refused", "older than iperf3 3.17", "OAEP"]),
    ("test authorization failed", "", (3, 21), True, ["login refused", "OAEP"]),
    ("test authorization failed", "error:1C80006A:Provider routines::output buffer too small",
     (3, 16), True, ["iperf3 3.16 cannot log in at all", "3.21"]),
    ("test authorization failed", "", (3, 12), False, ["requires a login", "--username"]),
])
def test_a_refused_login_is_explained_on_every_version(
        error, stderr, version, logged_in, fragments):
    line = iperf_client.explain_error(error, stderr, version, logged_in)
    assert "\n" not in line and line.endswith(error)
    for fragment in fragments:
        assert fragment in line


@pytest.mark.parametrize("error", [
    "control socket has closed unexpectedly",  # without a login: not a refused one
    "iperf3 printed no JSON result (exit code 0): iperf 3.12 ... authentication, bind to device",
])
def test_other_errors_are_not_taken_for_a_refused_login(error):
    assert iperf_client.explain_error(error, "", (3, 21), False) == error


@pytest.mark.parametrize("server", ["host\nname", "host\tname", "bad\x1bname"])
def test_a_server_name_with_control_characters_is_refused(tmp_path, server):
    done = run_script(CLIENT_SCRIPT, ["--server", server, "-d", tmp_path / "r"])
    assert_one_line_error(done, 2, "control character")
    assert not (tmp_path / "r").exists()


def test_iperf3s_version_banner_is_never_taken_for_a_refused_login(iperf3_server, tmp_path):
    """`-- -v` makes iperf3 print its banner ("... authentication ...") instead of a result."""
    done = run_script(CLIENT_SCRIPT, ["--server", "127.0.0.1", "--port", iperf3_server.port,
                                      "-t", "1", "-d", tmp_path, "--retries", "0", "--", "-v"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "printed no JSON result" in done.stderr
    assert "login" not in done.stderr and "authentication failed" not in done.stderr
