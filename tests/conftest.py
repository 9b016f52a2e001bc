"""Shared fixtures: free ports, real iperf3 servers, fake iperf3 executables, and the switches
that turn a missing tool from a skip (a developer's laptop) into a failure (CI)."""

import atexit
import csv
import datetime
import functools
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Test the scripts in this working tree, even when an older copy is pip-installed.
sys.path.insert(0, str(ROOT))
# Each test process (each xdist worker) its own empty HOME, set before the scripts are imported
# (iperf_client's RESULTS_DIR is read then): a default path such as ~/iperf.pid or
# ~/iperf_results is never another worker's, nor the developer's own. Tests that run a script
# with its defaults give it a HOME of their own as well.
os.environ["HOME"] = tempfile.mkdtemp(prefix="cip-home-")
atexit.register(shutil.rmtree, os.environ["HOME"], True)

import iperf_client  # noqa: E402 (needs the path above)
import iperf_server  # noqa: E402
SERVER_SCRIPT = ROOT / "iperf_server.py"
CLIENT_SCRIPT = ROOT / "iperf_client.py"


# Two beds at a time: one at a time made the longest wait of a run (about 135 s of timed tests),
# longer than the rest of the run. Two beds failed the wire's 10 ms test once in four runs when
# unpaced loopback tests beside them kept both CPUs busy; the suite's tests are paced now.
NETNS_GROUPS = 2
BED_RERUNS = 1


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Order and group the tests for xdist's workers (setup.cfg: `-n 8 --dist loadgroup`).

    The test-bed tests (marker netns) go in NETNS_GROUPS groups, each run one test at a time on
    one worker: at most that many beds share the CPU (their figures are timed; netbed gives a
    bed's processes the CPU first). They go first, then the other tests marked slow, so the
    longest waits start early and the short tests fill the gaps at the end, instead of one long
    test starting last.
    """
    beds = [item for item in items if item.get_closest_marker("netns")]
    for index, item in enumerate(beds):
        item.add_marker(pytest.mark.xdist_group("netns-%d" % (index % NETNS_GROUPS)))
        # A bed's wire and its hosts are processes of this machine: a virtual machine whose
        # host is busy delays them (seen: 5 ms sleeps overslept by up to 6 ms, the 40 ms wire
        # read 52-61 ms at its 99th percentile). A bed test that fails is measured once more;
        # one that fails twice fails the run (pytest-rerunfailures says each rerun).
        item.add_marker(pytest.mark.flaky(reruns=BED_RERUNS))
    items.sort(key=lambda item: (item.get_closest_marker("netns") is None,
                                 item.get_closest_marker("slow") is None))


def require(tool_ok, what, env_var):
    """Skip the calling test when `tool_ok` is false, or fail it when `env_var` is set to 1.

    CI sets REQUIRE_IPERF3 / REQUIRE_NETNS / REQUIRE_BROWSER so that a machine lacking a tool
    fails loudly instead of passing with half the suite skipped.
    """
    if tool_ok:
        return
    if os.environ.get(env_var) == "1":
        pytest.fail("%s is required (%s=1) but missing" % (what, env_var))
    pytest.skip("%s not available" % what)


def iperf3_path():
    return shutil.which("iperf3")


@functools.lru_cache(maxsize=None)
def iperf3_version(path):
    """The version tuple of the iperf3 at `path` (None when its banner holds none)."""
    done = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=10)
    return iperf_server.parse_version(done.stdout)


# --- The iperf3 releases of the compatibility matrix (.ci/build-iperf3) ---

MATRIX = ("3.7", "3.9", "3.16", "3.18", "3.21")
BUILDS = Path(os.environ.get("IPERF3_BUILDS", "/var/cache/continuous-iperf/iperf3"))


def built_iperf3(version):
    """The iperf3 of `version`: from IPERF3_MATRIX ("VERSION PATH" lines, as .ci/build-iperf3
    prints them), else from the build cache; None when neither has it."""
    for line in os.environ.get("IPERF3_MATRIX", "").splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == version:
            return words[1]
    path = BUILDS / version / "bin" / "iperf3"
    return str(path) if os.access(str(path), os.X_OK) else None


# How each iperf3 says "server down" and "busy": 3.9 hides both reasons (docs/iperf3-versions.md)
# and reports only what became of its control connection.
CANNOT_CONNECT = ("unable to connect", "unable to send control message: Bad file descriptor")
SAYS_BUSY = ("busy", "unable to send control message: Connection reset by peer",
             "unable to send control message: Broken pipe")


def says(text, words):
    """True when `text` holds one of `words` (CANNOT_CONNECT, SAYS_BUSY)."""
    return any(word in text for word in words)


# A bug of iperf3's own, named where a test cannot run because of it.
CLIENT_LOGIN_BUG = ("iperf3 3.16-3.20 clients cannot log in with a current OpenSSL 3: they send "
                    "an empty login (\"output buffer too small\"; esnet/iperf issue 1951, fixed "
                    "in 3.21 by PR 1956)")


def client_login_broken(path):
    """True for an iperf3 whose client fails every login (CLIENT_LOGIN_BUG)."""
    version = iperf3_version(path)
    return version is not None and (3, 16) <= version[:2] < (3, 21)


@pytest.fixture
def iperf3():
    """Path of the real iperf3 (skips or fails per REQUIRE_IPERF3 when there is none)."""
    path = iperf3_path()
    require(path is not None, "iperf3", "REQUIRE_IPERF3")
    return path


# Ports for the tests' servers come from below the kernel's ephemeral range (which iperf3's own
# client connections draw from), cut into one share per xdist worker: two workers can never be
# handed the same port, and no outgoing connection can take a port between the check and the bind.
FIRST_TEST_PORT = 10000


def _ports_of_this_worker():
    """This worker's ports, in a cycle that starts at an offset of this process's own."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            ephemeral = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    share = (ephemeral - FIRST_TEST_PORT) // count
    if share < 100:  # an odd ephemeral range: the kernel's choice (bind to port 0) instead
        return None
    first = FIRST_TEST_PORT + (int(worker) if worker.isdigit() else 0) * share
    # Another test session on this machine (another checkout) starts elsewhere in the share.
    offset = os.getpid() % share
    return itertools.cycle([first + (offset + n) % share for n in range(share)])


_PORTS = _ports_of_this_worker()


def port_is_free(port):
    """True when a TCP socket can bind `port` on every address and nothing uses it on UDP."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
    return not listening(port)


def free_port():
    """A port that nothing uses right now (TCP and UDP), never handed out twice by this
    session's workers."""
    if _PORTS is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    for port in _PORTS:
        if port_is_free(port):
            return port


def wait_until(predicate, timeout=10.0, interval=0.05):
    """Poll `predicate` until it returns true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def kill_process(proc):
    """Stop a Popen for good: SIGCONT (a stopped process cannot die of TERM), TERM, then KILL."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def kill_pid(pid):
    """Like kill_process, for a process we did not start ourselves (a daemon); never raises."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
    if wait_until(lambda: not pid_alive(pid), timeout=3):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_until(lambda: not pid_alive(pid), timeout=3)


def pid_alive(pid):
    """True while `pid` exists and is not a zombie, or is one whose threads still run (iperf3
    3.16+ runs its streams in threads)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                return True
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return iperf_server.live_threads(pid)


class IperfServer:
    """A real `iperf3 -s` in the foreground on a random free loopback port."""

    def __init__(self, executable, port, extra=()):
        self.port = port
        self.proc = subprocess.Popen(
            [executable, "-s", "-B", "127.0.0.1", "-p", str(port), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # Wait passively (/proc/net/tcp): a connection made only to see the port open counts as
        # a failed test to iperf3, which then resets the next client's connection now and then.
        if not wait_until(lambda: listening(port) or self.proc.poll() is not None):
            raise RuntimeError("iperf3 server did not start on port %d" % port)
        if self.proc.poll() is not None:
            raise RuntimeError("iperf3 server exited with %s" % self.proc.returncode)

    def stop(self):
        kill_process(self.proc)


@pytest.fixture
def iperf3_server(iperf3):
    """A real iperf3 server on a random free port; yields it and kills it afterwards."""
    server = IperfServer(iperf3, free_port())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_iperf3_server(iperf3):
    """Factory for extra real iperf3 servers (extra arguments, another executable allowed); all
    killed afterwards."""
    servers = []

    def start(extra=(), port=None, executable=None):
        server = IperfServer(executable or iperf3, port or free_port(), extra)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def add_user(users_file, username, password):
    """Add a user to an iperf3 authorized users file with the server script, as an admin would
    (the password on stdin)."""
    added = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--add-user", username,
                            "--authorized-users-path", str(users_file)], input=password + "\n",
                           universal_newlines=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=30)
    assert added.returncode == 0, added.stderr


# --- Logins: one RSA key pair and one users file a worker, each test its own copy ---

USER, PASSWORD = "tester", "Corr3ct-Horse"


@pytest.fixture(scope="session")
def worker_credentials(tmp_path_factory):
    """The key pair made by `iperf_server.py --make-keys` and a users file with USER made by
    `--add-user`, once a worker: a 2048-bit key costs openssl 0.1-0.3 s of CPU, and a pair a
    test was 16 s of a run."""
    folder = tmp_path_factory.mktemp("credentials")
    done = run_script(SERVER_SCRIPT, ["--make-keys", folder / "keys"])
    assert done.returncode == 0, done.stderr
    add_user(folder / "users.csv", USER, PASSWORD)
    return folder


@pytest.fixture
def credentials(worker_credentials, tmp_path):
    """(private key, public key, users file) for USER / PASSWORD: this test's own copies (the
    private key and the users file 0600, as made)."""
    shutil.copytree(str(worker_credentials), str(tmp_path / "credentials"))
    folder = tmp_path / "credentials"
    return folder / "keys" / "private.pem", folder / "keys" / "public.pem", folder / "users.csv"


@pytest.fixture
def fake_iperf3(tmp_path):
    """Factory writing an executable Python script named `iperf3` into its own folder.

    `fake_iperf3(body)` returns the script's path; `body` is Python source run with `sys`, `os`,
    `time`, `json` and `signal` imported and `args` = sys.argv[1:]. It stands in for what a real
    iperf3 can't do on demand: hang, crash, print noise, claim another version.
    """
    count = [0]

    def make(body):
        count[0] += 1
        folder = tmp_path / ("fake-bin-%d" % count[0])
        folder.mkdir()
        script = folder / "iperf3"
        script.write_text(
            "#!%s\nimport sys, os, time, json, signal\nargs = sys.argv[1:]\n%s\n"
            % (sys.executable, textwrap.dedent(body))
        )
        script.chmod(0o755)
        return script

    return make


def run_script(script, args, env=None, timeout=120, cwd=None):
    """Run one of our scripts as cron would: a subprocess, stdin closed, no terminal.

    A script of this checkout runs as `python3 -m NAME` (the checkout on PYTHONPATH): the same
    __main__, sys.argv[0] the file's full path, but from the bytecode Python caches. Run by its
    path, the 5,000-line client spends 83 of its 167 ms of CPU compiling itself (the server 22 of
    98 ms): about 30 of a pass's 250 CPU-s over some 750 runs. The README's crontab lines
    (test_readme), the runs in the test bed and the other Popen'd runs still run the files by
    path."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    script = Path(script)
    if script.parent == ROOT:
        full_env["PYTHONPATH"] = os.pathsep.join(
            path for path in (str(ROOT), full_env.get("PYTHONPATH")) if path)
        command = [sys.executable, "-m", script.stem]
    else:
        command = [sys.executable, str(script)]
    return subprocess.run(
        command + [str(a) for a in args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, env=full_env, timeout=timeout, cwd=cwd,
    )


# The suite's real iperf3 tests send PACE a stream. On loopback an unpaced test keeps a core busy
# on each side for its whole length: four workers of them took most of a 2-core machine and
# starved the test bed's timers. What those tests check (files, rows, logins, daemons) needs no
# speed; the tests of figures (test bed, latency grades) run unpaced.
PACE = "50M"
QUICK = ["-t", "1", "--busy-wait", "0", "--retries", "0", "--timeout-margin", "5"]


def paced(args, iperf3=None):
    """A client command line (words) whose iperf3 tests send PACE a stream (a --udp run has its
    own rate). A paced iperf3 3.16 spins a core a stream (esnet/iperf 1741, fixed in 3.17): a
    run of `iperf3` 3.16 stays unpaced, cheaper so."""
    words = [str(arg) for arg in args]
    if "--udp" in words or (iperf3 and (iperf3_version(str(iperf3)) or ())[:2] == (3, 16)):
        return words
    return words + ([] if "--" in words else ["--"]) + ["-b", PACE]


def hold_server(iperf3, port):
    """A client testing against `port` for a minute; returns once its test runs."""
    client = subprocess.Popen([iperf3, "-c", "127.0.0.1", "-p", str(port), "-t", "60",
                               "-b", "1M", "-i", "0.5", "--forceflush"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True)
    # Probe only once the test runs: a probe racing the client's connect would take the
    # server first and leave the client with "busy".
    for line in client.stdout:
        if "sec" in line and "bits/sec" in line:
            break
    assert client.poll() is None, "the holding client did not start its test"
    return client


# --- The server script's test host ---

def listening(port):
    """Passive check (/proc/net/tcp): connecting would count as a test to the server."""
    return bool(iperf_server.listening_addresses(port))


class ServerHost:
    """One test's server-side files and port, and the way to run the script against them."""

    def __init__(self, folder, port):
        self.folder = folder
        self.port = port
        self.pidfile = str(folder / "iperf.pid")
        self.log_file = str(folder / "iperf_monitor.log")

    def run(self, *extra, port=None, env=None):
        args = ["--pidfile", self.pidfile, "--log-file", self.log_file,
                "-p", str(port or self.port), *extra]
        return run_script(SERVER_SCRIPT, args, env=env)

    def pid(self):
        with open(self.pidfile, "rb") as handle:
            return iperf_server.parse_pidfile(handle.read())

    def daemons(self):
        return iperf_server.our_daemons(self.pidfile)

    def log(self):
        with open(self.log_file) as handle:
            return handle.read()


@pytest.fixture
def host(tmp_path, iperf3):
    """Files and a free port for one iperf_server.py; kills every daemon it started."""
    server_host = ServerHost(tmp_path, free_port())
    try:
        yield server_host
    finally:
        for pid in server_host.daemons():
            kill_pid(pid)
        # Then anything else whose command line names this test's folder (a daemon caught in
        # the middle of forking by the scan above), twice, a moment apart.
        for _ in range(2):
            for pid in pids_naming(str(tmp_path)):
                kill_pid(pid)
            time.sleep(0.1)


def live_argvs():
    """(pid, argv as a list of words) of every live process but this one, read from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if pid_alive(int(entry)):
            yield int(entry), argv


def pids_naming(text):
    """Live processes (not this one) with `text` anywhere in their command line."""
    return [pid for pid, argv in live_argvs() if any(text in word for word in argv)]


def assert_quiet_success(done):
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""


def assert_one_line_error(done, code, *fragments):
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# --- Ledgers and results for the client's tests ---

LEDGER_COLUMNS = list(iperf_client.LEDGER_COLUMNS)


def ledger_cells(row, columns=iperf_client.LEDGER_COLUMNS):
    """A row given as a dict by column name, as a list in the order of `columns` (the ledger's
    by default; iperf_client.BASE_COLUMNS for a version 2.1 ledger); missing cells are empty."""
    return [row.get(column, "") for column in columns]


def ledger_row(direction="forward", run="20260101_000000", prefix="", **cells):
    """The one row builder: a ledger row (a dict by column name) of an ok test of 1.25 bit/s
    received, `cells` (by column name) changing any of it. Its result file is named after
    `prefix`, `run` and `direction`, as the client names it."""
    row = dict.fromkeys(LEDGER_COLUMNS, "")
    row.update(timestamp="2026-01-01T00:00:00+00:00", run=run, prefix=prefix,
               direction=direction, server="h", port="5201", streams="2", duration="1",
               status="ok", sent_bps="1.5", received_bps="1.25", retransmits="0", attempts="1",
               file="%s%s_%s.json" % (prefix, run, "client" if direction == "forward"
                                      else "server"))
    unknown = set(cells) - set(LEDGER_COLUMNS)
    assert not unknown, "not ledger columns: %s" % sorted(unknown)
    row.update(cells)
    return row


def row_at(moment, direction, received=None, error="", prefix="", port=5201, run_at=None):
    """A ledger row (a dict) of a test started at `moment` (Unix seconds), of the run started
    at `run_at` (default: `moment`); an error when `received` (bit/s) is None."""
    run = datetime.datetime.fromtimestamp(moment if run_at is None else run_at).strftime(
        iperf_client.TIMESTAMP_FORMAT)
    ok = received is not None
    return ledger_row(direction, run, prefix, timestamp=iperf_client.iso_time(moment),
                      server="192.0.2.7", port=str(port), streams="30", duration="60",
                      status="ok" if ok else "error", error=error,
                      sent_bps=repr(received * 1.01) if ok else "",
                      received_bps=repr(received) if ok else "", retransmits="7" if ok else "")


def row_stamped(timestamp, direction="forward", status="ok", received="", retransmits="",
                prefix="", error="", run="20240301_100000", file=None):
    """A ledger row (a dict) with the ISO `timestamp` given as it is."""
    row = ledger_row(direction, run, prefix, timestamp=timestamp, server="192.0.2.1",
                     streams="30", duration="60", status=status, error=error,
                     sent_bps=received, received_bps=received, retransmits=retransmits)
    if file is not None:
        row["file"] = file
    return row


def old_rows(count):
    """`count` rows of a version 2.1 ledger (iperf_client.BASE_COLUMNS only), runs a second
    apart."""
    return [ledger_cells(ledger_row(run="20260101_00000%d" % n), iperf_client.BASE_COLUMNS)
            for n in range(count)]


# A row of a version 2.1 ledger (BASE_COLUMNS only).
BASE_ROW = ledger_cells(ledger_row(), iperf_client.BASE_COLUMNS)


def write_ledger(folder, rows):
    """A ledger of `rows` (dicts by column name, as row_at and row_stamped make them)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(str(folder / "results.csv"), "w") as handle:
        handle.write(iperf_client.csv_line(LEDGER_COLUMNS))
        for one in rows:
            handle.write(iperf_client.csv_line(ledger_cells(one)))


def read_ledger(folder):
    """The ledger of a results folder as dicts; it must have the standard header."""
    with open(os.path.join(str(folder), "results.csv"), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == LEDGER_COLUMNS
    return [dict(zip(LEDGER_COLUMNS, row)) for row in rows[1:]]


# A fake iperf3 printing a small but iperf3-shaped result (reverse when -R is given).
FAKE_RESULT = """
reverse = 1 if "-R" in args else 0
doc = {"start": {"timestamp": {"timesecs": 1700000000 + reverse},
                 "test_start": {"num_streams": 2, "duration": 1, "omit": 0,
                                "reverse": reverse}},
       "intervals": [],
       "end": {"sum_sent": {"bits_per_second": 1000.5 + reverse, "retransmits": 3},
               "sum_received": {"bits_per_second": 900.25 + reverse}}}
"""


def pids_with(*needles):
    """Live processes whose argv contains every one of `needles` (a word each)."""
    return [pid for pid, argv in live_argvs() if all(needle in argv for needle in needles)]
