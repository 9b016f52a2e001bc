#!/usr/bin/env python3
"""Keep exactly one healthy iperf3 server (`iperf3 -s -D`) running on this host.

Meant for cron, every minute. Whatever it finds -- no daemon, a crashed one, a stale or garbled
pidfile, a PID recycled by another program, a daemon that is alive but hung or stuck "busy" --
it leaves one healthy daemon behind and says so only when something is wrong. A run that ends
with a healthy server prints nothing (cron mails whatever a job prints); the log file has the
details.

Usage:
    iperf_server.py                      # make sure the server runs (the cron job)
    iperf_server.py --status             # one line; exit 0 healthy, 1 unhealthy, 3 not running
    iperf_server.py --stop               # stop it
    iperf_server.py -p 5202 -- --rcv-timeout 30000   # after --: passed to iperf3 unchanged

Crontab line (every minute):
    (crontab -l ; echo "* * * * * ~/iperf_server.py") | crontab -

Exit codes: 0 a healthy server is running; 1 no healthy server could be had; 2 usage;
--status: 0 healthy, 1 running but unhealthy, 3 not running.
"""

import argparse
import errno
import fcntl
import getpass
import hashlib
import json
import logging
import logging.handlers
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

__version__ = "2.3.0"  # the project's version: both scripts and the package

# --- Settings an admin may edit (each one is also a command-line flag) ----------------------------
# The two files below are IPERF_PORT's; a server on another port gets its own, named after the
# port (~/iperf-5202.pid, ~/iperf_monitor-5202.log), so that one crontab line per port just works.
IPERF_PID_FILE = os.path.expanduser("~/iperf.pid")  # where iperf3 writes its PID (absolute)
IPERF_MONITOR_LOG = os.path.expanduser("~/iperf_monitor.log")  # this script's log
IPERF_EXECUTABLE = "iperf3"  # iperf3 executable: a name looked up on PATH, or a path
IPERF_PORT = 5201  # port the server listens on (iperf3's default)
IPERF_BIND = None  # address to listen on; None = all addresses
IPERF_EXTRA_ARGS = []  # more iperf3 server arguments, e.g. ["--rcv-timeout", "30000"]
RSA_PRIVATE_KEY_PATH = None  # with AUTHORIZED_USERS_PATH: only authorised clients get tests
AUTHORIZED_USERS_PATH = None  # "username,sha256hex" lines; made by --add-user
LEGACY_CLIENTS = False  # iperf3 3.17+ server: accept the logins of clients older than 3.17
MAX_BUSY_MINUTES = 10.0  # restart a server that has answered "busy" for longer than this
HEALTH_PROBE = True  # probe the server with a tiny test each run (--no-probe: False)

# --- Constants ------------------------------------------------------------------------------------

SCRIPT_NAME = "iperf_server.py"  # program_name() when run by another name than iperf*
OPENSSL_EXECUTABLE = "openssl"  # used by --make-keys only
START_TIMEOUT = 5.0  # seconds to wait for a spawned daemon to write its pidfile and listen
PROBE_TIMEOUT = 5.0  # seconds a health probe may take before the server counts as hung
STOP_TIMEOUT = 3.0  # seconds between SIGTERM and SIGKILL when stopping the daemon
RESTART_ALARM = 5  # this many starts within RESTART_WINDOW: say so on stderr (a restart loop?)
RESTART_WINDOW = 15 * 60  # seconds
# Settings asked for by runs this recent count as a watchdog that is still there: two of them
# alive with different settings share a pidfile (cron runs each every minute; a run may wait
# up to LOCK_TIMEOUT for the other).
SHARED_WINDOW = 3 * 60  # seconds
LOCK_TIMEOUT = 50.0  # seconds to wait for another run of this script (cron runs every 60 s)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3  # --status only (LSB init-script convention)

# Options the script owns: after `--` they would contradict or defeat what the watchdog manages.
OWNED_SHORT = "sDIpBc1"
OWNED_LONG = ("server", "daemon", "pidfile", "port", "bind", "client", "one-off",
              "rsa-private-key-path", "authorized-users-path")
# iperf3's short options that take a value (its getopt string), to read clusters like "-VB addr".
SHORT_WITH_VALUE = "pficbtnklPwBMSLOFATCIX"

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a symlink planted at the log's name is not followed
BUSY_MARK = "server is busy"  # the same words in every iperf3 from 3.1 to 3.21
CONTROL_CLOSED_MARK = "control socket has closed unexpectedly"
CONNECT_FAILED_MARK = "unable to connect"  # the one error that says no connection was made
SND_TIMEOUT_MS = 30000  # --snd-timeout guard: a reverse test's client gone this long is dropped
PKCS1_PADDING_SINCE = (3, 17)  # iperf3 pads logins with OAEP from 3.17; --use-pkcs1-padding
GUARD_OPTIONS = {"--snd-timeout": 1, "--json": 0}  # what guard_args may add: option, values
TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"  # socket states in /proc/net/tcp
WILDCARDS = {"0.0.0.0", "::"}  # bind addresses that mean "every address"

log = logging.getLogger("iperf_server")


# --- Shared with iperf_server.py / iperf_client.py ------------------------------------------------
# Both scripts hold this block byte for byte (they are copied to hosts one at a time, so neither
# can import the other); tests/test_contract.py fails when the two copies differ. Change both.

LOG_FORMAT = "%(asctime)s %(name)-12s %(levelname)-8s %(message)s"  # a log file's lines
LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # with year and zone: lines of two hosts compare


class IperfError(Exception):
    """An expected failure, with a message fit for a person (one line); `status` is the exit
    code it ends the script with."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def program_name():
    """How the script was invoked: the installed command's name (iperf-client, iperf-server) or
    the file's (SCRIPT_NAME). Every line the script writes on stderr starts with it."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("iperf") else SCRIPT_NAME


def say(message):
    """One line on stderr, after the program's name."""
    sys.stderr.write("%s: %s\n" % (program_name(), message))


def say_error(message):
    """A fatal line, "<program>: error: ...", as argparse's own."""
    say("error: %s" % message)


def say_warning(message):
    """A warning line, "<program>: warning: ..."."""
    say("warning: %s" % message)


def one_line(text, limit=500):
    """Collapse whitespace so a message fits one log or CSV line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def split_extra(argv):
    """Split our arguments from iperf3's: those after the first `--` are added to
    IPERF_EXTRA_ARGS (the same in both scripts)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], list(IPERF_EXTRA_ARGS) + argv[cut + 1:]
    return argv, list(IPERF_EXTRA_ARGS)


def owned_option(args):
    """The first argument in `args` that sets an option this script owns (OWNED_SHORT,
    OWNED_LONG), and that option's own spelling: (argument, option), or None. Knows what
    iperf3's getopt_long accepts: attached values (`-p5201`, `--port=5201`), abbreviations
    (`--rev`) and clusters of short flags (`-ZR`); the value that follows an option taking one
    is no option."""
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0]
            for owned in OWNED_LONG:
                if owned.startswith(name):
                    return arg, "--" + owned
        elif arg.startswith("-") and len(arg) > 1:
            flags = short_flags(arg)
            owned = next((char for char in flags if char in OWNED_SHORT), None)
            if owned:
                return arg, "-" + owned
            # An option taking a value, last in the word: the next argument is its value.
            skip_next = flags[-1] in SHORT_WITH_VALUE and len(flags) == len(arg) - 1
    return None


def short_flags(arg):
    """The flags of a short-option cluster (`-uZ` -> "uZ"), up to and with the first one that
    takes a value (the rest of the word is that value: `-b5M` -> "b", `-Bjupiter` -> "B"); ""
    for anything else."""
    if not arg.startswith("-") or arg.startswith("--"):
        return ""
    flags = ""
    for char in arg[1:]:
        flags += char
        if char in SHORT_WITH_VALUE:
            break
    return flags


def parse_version(text):
    """The version tuple in `iperf3 --version` output ("iperf 3.12 (cJSON ...)" -> (3, 12)),
    or None when the text holds none."""
    match = re.search(r"\biperf (\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def stderr_message(stderr):
    """iperf3's own message on stderr: the text of its "iperf3: error - ..." line, else its
    last line ("" when it said nothing)."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    for line in lines:
        if "error - " in line:
            return one_line(line.split("error - ", 1)[1])
    return one_line(lines[-1]) if lines else ""

# --- End of the block shared with iperf_server.py / iperf_client.py -------------------------------


# --- Errors ---------------------------------------------------------------------------------------

class UsageError(IperfError):
    """Bad flags or settings: exit 2."""

    def __init__(self, message):
        super().__init__(message, EXIT_USAGE)


# --- Pure helpers ---------------------------------------------------------------------------------

def parse_pidfile(content):
    """Return the PID held in a pidfile's raw bytes, or None when it holds none.

    iperf3 3.10+ writes "%d" with no newline, older versions add a NUL; other builds and admins
    leave newlines or spaces. Empty or anything else is garbage: None (a stale pidfile).
    """
    text = content.replace(b"\0", b" ").strip()
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid > 0 else None


def port_file(path, port):
    """The default file `path` (IPERF_PID_FILE, IPERF_MONITOR_LOG) of the server on `port`:
    IPERF_PORT's keeps its name; another port's gets "-PORT" before the extension."""
    if port == IPERF_PORT:
        return path
    stem, extension = os.path.splitext(path)
    return "%s-%d%s" % (stem, port, extension)


def check_extra_args(extra):
    """Raise UsageError when an argument meant for iperf3 would replace one the script owns."""
    owned = owned_option(extra)
    if owned:
        raise UsageError("%s cannot be passed to iperf3 after --: the script sets it "
                         "(use this script's own flag where there is one)" % owned[1])


def daemon_argv(executable, pidfile, port, bind, extra, auth=None, legacy_clients=False):
    """The argv of the daemon the settings ask for; what a live daemon's cmdline is compared to
    (the version's guard_args follow it in the daemon's real argv).

    `auth` is (private key path, authorized users path), absolute, or None.
    """
    argv = [executable, "-s", "-D", "--pidfile", pidfile, "-p", str(port)]
    if bind:
        argv += ["-B", bind]
    if auth:
        argv += ["--rsa-private-key-path", auth[0], "--authorized-users-path", auth[1]]
    if legacy_clients:
        argv.append("--use-pkcs1-padding")
    return argv + list(extra)


def password_hash(username, password):
    """What iperf3 keeps in its authorized users file: hex SHA-256 of "{username}password"."""
    return hashlib.sha256(("{%s}%s" % (username, password)).encode()).hexdigest()


def check_credentials(username, password):
    """Raise UsageError for what iperf3 cannot carry: commas or blanks in a name (the file is
    "name,hash"), a name starting with "#" (iperf3 reads that line as a comment), blanks in a
    password (they do not survive iperf3's handling)."""
    if not username or any(c == "," or c.isspace() for c in username):
        raise UsageError("user name must be non-empty, without commas or whitespace: %r"
                         % username)
    if username.startswith("#"):
        raise UsageError("user name must not start with '#' (iperf3 reads the line as a "
                         "comment): %r" % username)
    if not password:
        raise UsageError("empty password")
    try:
        password.encode("utf-8")
    except UnicodeError:
        raise UsageError("the password is not valid UTF-8 text")
    if any(c.isspace() for c in password):
        raise UsageError("password must not contain whitespace (iperf3 cannot carry it)")


def users_file_with(lines, username, digest):
    """The users file's lines with `username`'s entry replaced (or appended); comments kept."""
    entry = "%s,%s" % (username, digest)
    kept = [line for line in lines if line.split(",", 1)[0].strip() != username]
    return kept + [entry]


def probe_argv(executable, address, port):
    """A tiny client test: 1 KB, JSON output, a 2 s connect timeout (iperf3 3.2+). `-i 0.1`:
    a 3.16+ client ends a test only at its next report tick and spins on a core until then
    (a second of CPU a probe at the default `-i 1`, a tenth at 0.1; `-i 0` never ends)."""
    return [executable, "-c", address, "-p", str(port), "-n", "1K", "-i", "0.1", "-J",
            "--connect-timeout", "2000"]


def probe_address(bind):
    """Where to reach our own server: its bind address, or loopback when it listens everywhere."""
    if not bind or bind in ("0.0.0.0", "::", "[::]"):
        return "127.0.0.1"
    return bind.split("%", 1)[0]  # "ADDR%dev" binds to a device too; connect to the address


def version_text(version):
    return ".".join(map(str, version)) if version else "of unknown version"


def probe_finished(document):
    """True when a probe's JSON holds the figures of a finished test."""
    end = document.get("end")
    return isinstance(end, dict) and all(
        isinstance(end.get(key), dict) and "bits_per_second" in end[key]
        for key in ("sum_sent", "sum_received"))


def probe_error(returncode, stdout, stderr):
    """The error of a probe, or None when it measured. Never trusts iperf3's exit code or its
    "error" key alone: 3.12 exits 0 on errors, and 3.9 prints a document with an empty "end"
    and no "error" (its message goes to stderr) when a login is refused or the server is busy.
    """
    start = stdout.find("{")
    try:
        document, _ = json.JSONDecoder().raw_decode(stdout[start:]) if start >= 0 else (None, 0)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return stderr_message(stderr) or "probe printed no result (exit code %s)" % returncode
    if document.get("error") is not None:
        return str(document["error"])
    if probe_finished(document):
        return None
    return stderr_message(stderr) or "iperf3 reported no result (exit code %s)" % returncode


def classify_probe(returncode, stdout, stderr, timed_out, authenticating=False):
    """Turn a probe's outcome into (verdict, detail); verdict is "ok", "busy", "fail" or
    "dropped".

    A refused login is an answer: the server is alive and checks credentials. The probe has
    none, so against an authenticating server it is always refused; iperf3 3.7-3.18 say "test
    authorization failed", 3.21 only closes the control connection ("control socket has closed
    unexpectedly") or, after real logins, drops it ("unable to write to stream socket: Bad file
    descriptor", "Connection reset by peer", "Transport endpoint is not connected"): any
    prompt error but "unable to connect" is "dropped", an answer only if the port is still
    listened on (3.9 says "unable to send control message: Bad file descriptor" of a server
    that is down; the caller looks). A hung server does not answer at all: the probe times
    out.
    """
    if timed_out:
        return "fail", "no answer within %g s (hung or stopped?)" % PROBE_TIMEOUT
    error = probe_error(returncode, stdout, stderr)
    if error is None:
        return "ok", "answered"
    if BUSY_MARK in error:
        return "busy", "busy running a test"
    if "authorization failed" in error:
        return "ok", "answered (authentication required)"
    if authenticating and CONTROL_CLOSED_MARK in error:
        return "ok", "answered (authentication required)"
    if authenticating and CONNECT_FAILED_MARK not in error:
        return "dropped", error
    return "fail", error


def guard_args(version, extra):
    """Options added by version, where `extra` does not set them already: --snd-timeout (3.12+)
    ends a reverse test whose client vanished; --json makes the daemon's result of each test
    JSON, which a client's --get-server-output then receives whole (the server's own RTT of a
    reverse test: iperf_client.py puts it in its ledger). Not when `extra` names a --logfile:
    the admin reads that log, and it stays text.

    Left out on purpose: --rcv-timeout is on by default since 3.10; --idle-timeout closes and
    reopens the listening socket whenever no client came for a while; --server-max-duration
    (3.20+) also refuses every test timed by bytes (-n), the watchdog's probe included.
    """
    guards = []
    if version and version >= (3, 12) and not sets_option(extra, "--snd-timeout"):
        guards += ["--snd-timeout", str(SND_TIMEOUT_MS)]
    if not (sets_option(extra, "--json") or sets_option(extra, "--logfile")
            or sets_option(extra, "--json-stream")
            or any("J" in short_flags(arg) for arg in extra)):
        guards.append("--json")
    return guards


def iperf3_logfile(args):
    """The value of iperf3's --logfile in `args` (`--logfile F`, `--logfile=F`, or an
    abbreviation getopt_long would accept), or None."""
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if len(name) > 2 and name.startswith("--") and "--logfile".startswith(name):
            return value if equals else (args[i + 1] if i + 1 < len(args) else None)
    return None


def sets_option(args, long_option):
    """True when `args` set `long_option` (or an abbreviation getopt_long would accept)."""
    return any(arg.startswith("--") and len(arg) > 2
               and long_option.startswith(arg.split("=", 1)[0]) for arg in args)


def format_duration(seconds):
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return "%dd%dh" % (days, hours)
    if hours:
        return "%dh%02dm" % (hours, minutes)
    if minutes:
        return "%dm%02ds" % (minutes, seconds)
    return "%ds" % seconds


# --- Effects: processes ---------------------------------------------------------------------------

def run_captured(argv, timeout):
    """Run one command and return its subprocess.CompletedProcess: an argv list (never a
    shell), logged at DEBUG first (no secret ever travels in an argv here), stdin closed, its
    output captured as text, a hard timeout. Raises OSError and subprocess.TimeoutExpired as
    subprocess.run does; every command of this script runs through here."""
    log.debug("running: %s", " ".join(argv))
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def process_info(pid):
    """Return (state, argv) of a process, or None when there is no such process.

    /proc first; `ps` where there is no /proc (its args column loses the argv boundaries, which
    only matters for arguments with spaces).
    """
    if os.path.isdir("/proc/self"):
        try:
            with open("/proc/%d/stat" % pid, "rb") as stat:
                # The command name in parentheses may itself hold spaces or ")": split at the last.
                state = stat.read().rsplit(b")", 1)[1].split()[0].decode()
            with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
                raw = cmdline.read()
        except (OSError, IndexError):
            return None
        argv = [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]] if raw else []
        return state, argv
    try:
        out = run_captured(["ps", "-o", "stat=", "-o", "args=", "-p", str(pid)],
                           5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    state, _, args = out.partition(" ")
    return state[:1], args.split()


def all_pids():
    if os.path.isdir("/proc/self"):
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    out = run_captured(["ps", "-A", "-o", "pid="], 5).stdout
    return [int(word) for word in out.split()]


def names_pidfile(argv, pidfile):
    """True when a command line writes `pidfile` as iperf3's --pidfile."""
    for i, arg in enumerate(argv):
        if arg in ("--pidfile", "-I") and i + 1 < len(argv) and argv[i + 1] == pidfile:
            return True
        if arg == "--pidfile=" + pidfile:
            return True
    return False


def daemon_argv_of(pid, pidfile):
    """argv of `pid` if it is one of our daemons -- a live (not zombie) iperf3 server whose
    command line names our pidfile -- else None.

    Never trusts a bare PID: a PID recycled by another program, or by another iperf3 (a stale
    pidfile outlives a crash or a reboot), must never count as our server, nor be signalled.
    The executable's name is not trusted either: it may be a versioned copy or a wrapper.
    """
    if pid is None:
        return None
    info = process_info(pid)
    if info is None or info[0] in ("Z", "X"):
        return None
    argv = info[1]
    if names_pidfile(argv, pidfile) and ("-s" in argv or "--server" in argv):
        return argv
    return None


def our_daemons(pidfile):
    """PIDs of our live daemons (see daemon_argv_of), whether or not the pidfile names them."""
    return [pid for pid in all_pids()
            if pid != os.getpid() and daemon_argv_of(pid, pidfile) is not None]


def option_value(argv, short, long_):
    """The value of an option in a command line (`-p 5201`, `-p5201`, `--port 5201` or
    `--port=5201`), or None."""
    for i, arg in enumerate(argv):
        if arg in (short, long_) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(long_ + "="):
            return arg.split("=", 1)[1]
        if arg.startswith(short) and len(arg) > len(short) and not arg.startswith("--"):
            return arg[len(short):]
    return None


def same_command(running, wanted):
    """True when a running daemon's argv is the one the settings ask for (daemon_argv): the
    executable compared as the file it resolves to (cron's PATH and a shell's may spell it
    differently). The guards added after it by version are no setting: a daemon started with
    other guards or none (by an older iperf3 or an older copy of this script) is kept."""
    if not running or len(running) < len(wanted) or running[1:len(wanted)] != wanted[1:]:
        return False
    guards = running[len(wanted):]
    while guards:
        if guards[0] not in GUARD_OPTIONS or len(guards) <= GUARD_OPTIONS[guards[0]]:
            return False
        guards = guards[1 + GUARD_OPTIONS[guards[0]]:]
    return os.path.realpath(running[0]) == os.path.realpath(wanted[0])


def process_uptime(pid):
    """Seconds since `pid` started, or None when unknown."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat:
            start_ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            boot_seconds = float(uptime.read().split()[0])
        return boot_seconds - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        out = run_captured(["ps", "-o", "etimes=", "-p", str(pid)], 5).stdout
        return float(out.strip())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def live_threads(pid):
    """True when a thread of `pid` other than a dead leader still runs: iperf3 3.16+ runs its
    streams in threads, and its main thread can be a zombie while they still hold the port."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return False
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, task), "rb") as stat:
                if stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                    return True
        except (OSError, IndexError):
            continue
    return False


def wait_for_exit(pid, seconds):
    """Wait until `pid` is gone or a zombie; True when it is. An exiting process loses its
    command line before it closes its sockets, so "no longer ours" is not yet "gone": the port
    can still be taken for a few milliseconds."""
    deadline = time.monotonic() + seconds
    while True:
        info = process_info(pid)
        if info is None or (info[0] in ("Z", "X") and not live_threads(pid)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def stop_process(pid, pidfile, reason):
    """SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, wait, SIGKILL. Re-checks
    that `pid` is still our daemon right before each signal, so a recycled PID is left alone."""
    if daemon_argv_of(pid, pidfile) is None:
        return
    log.warning("stopping iperf3 (pid %d): %s", pid, reason)
    try:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        raise IperfError("not allowed to stop iperf3 (pid %d): run as its owner" % pid)
    if wait_for_exit(pid, STOP_TIMEOUT):
        return
    if daemon_argv_of(pid, pidfile) is not None:
        log.warning("iperf3 (pid %d) ignored SIGTERM for %g s: sending SIGKILL", pid,
                    STOP_TIMEOUT)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
    if not wait_for_exit(pid, STOP_TIMEOUT):
        raise IperfError("iperf3 (pid %d) did not exit after SIGKILL" % pid)


def port_accepts(address, port, timeout=1.0):
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def decode_proc_address(hex_address):
    """An address from /proc/net/tcp{,6}: 32-bit words in host byte order, as hex."""
    words = [int(hex_address[i:i + 8], 16) for i in range(0, len(hex_address), 8)]
    packed = b"".join(struct.pack("=I", word) for word in words)
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def tcp_sockets(port):
    """The TCP sockets whose local port is `port`, as (state, local address, remote
    "address:port", inode) read from /proc/net/tcp and tcp6; None where those do not exist."""
    found, readable = [], False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()
            local, _, local_port = fields[1].partition(":")
            if int(local_port, 16) == port:
                remote, _, remote_port = fields[2].partition(":")
                found.append((fields[3], decode_proc_address(local), "%s:%d" % (
                    decode_proc_address(remote), int(remote_port, 16)), fields[9]))
    return found if readable else None


def listening_addresses(port):
    """Addresses with a TCP socket listening on `port`, or None without /proc/net/tcp."""
    sockets = tcp_sockets(port)
    if sockets is None:
        return None
    return {local for state, local, _, _ in sockets if state == TCP_LISTEN}


def established_peers(port):
    """The remote ends ("address:port") of the connections to `port`: who a busy server is
    busy with. Empty without /proc/net/tcp."""
    return {remote for state, _, remote, _ in tcp_sockets(port) or []
            if state == TCP_ESTABLISHED}


def listener_owner(port):
    """"pid N: command line" of a process listening on `port`, or None when unknown (another
    user's process, or no /proc)."""
    inodes = {inode for state, _, _, inode in tcp_sockets(port) or [] if state == TCP_LISTEN}
    wanted = {"socket:[%s]" % inode for inode in inodes}
    for pid in all_pids() if wanted else []:
        try:
            links = {os.readlink("/proc/%d/fd/%s" % (pid, fd))
                     for fd in os.listdir("/proc/%d/fd" % pid)}
        except OSError:
            continue
        if links & wanted:
            info = process_info(pid)
            return "pid %d: %s" % (pid, " ".join(info[1]) if info else "?")
    return None


def resolve_bind(bind):
    """The numeric addresses a --bind value stands for (it may be a host name, or carry a
    "%dev" suffix); raises IperfError when it does not resolve."""
    host = bind.split("%", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise IperfError("cannot resolve --bind %s: %s" % (bind, exc))
    addresses = {info[4][0] for info in infos}
    return addresses | {"::ffff:" + address for address in addresses if ":" not in address}


def port_listening(address, port, bind):
    """True when something listens on `port` where a server bound to `bind` (None: every
    address) would collide with it.

    Read passively from /proc: connecting to an iperf3 server counts as a (failed) test, and
    one that comes just before our probe can reset the probe's connection. Only without
    /proc do we connect.
    """
    listeners = listening_addresses(port)
    if listeners is None:
        return port_accepts(address, port)
    if not bind or bind.split("%", 1)[0] in WILDCARDS:
        return bool(listeners)
    return bool(listeners & (resolve_bind(bind) | WILDCARDS))


# --- Effects: files -------------------------------------------------------------------------------

def read_pidfile(path):
    try:
        with open(path, "rb") as handle:
            return parse_pidfile(handle.read(64))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IperfError("cannot read pidfile %s: %s" % (path, exc.strerror))


def remove_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise IperfError("cannot remove %s: %s" % (path, exc.strerror))


def write_file_atomically(path, text, mode=0o600, owner=None):
    """Write a temporary file beside `path` (mkstemp: never follows a planted symlink), fsync,
    rename: a reader sees the old file or the new one, never half of one. `owner` is a
    (uid, gid) to give the new file, so that root editing a daemon user's file keeps it
    readable by that user."""
    folder = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        remove_file(temporary)
        raise


def check_writable_folder(folder, what):
    """Raise IperfError naming the cause when a small file cannot be written in `folder` (not
    allowed, a full disk, a read-only file system): iperf3 itself fails there in silence."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        try:
            os.write(fd, b"%d\n" % os.getpid())
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise IperfError("cannot write %s in %s: %s" % (what, folder, exc.strerror or exc))


def read_state(path):
    """The watchdog's memory between runs (busy since when, last probe); {} when missing."""
    try:
        with open(path) as handle:
            state = json.load(handle)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(path, state):
    try:
        write_file_atomically(path, json.dumps(state, sort_keys=True) + "\n")
    except OSError as exc:
        raise IperfError("cannot write state file %s: %s" % (path, exc.strerror))


class FileLock:
    """An exclusive flock on `path`, waited for up to `timeout` seconds.

    Cron starts a run every minute whether or not the last one finished; the lock makes the
    runs take turns, so they can never start two daemons.
    """

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self.fd = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise IperfError("cannot open lock file %s: %s" % (self.path, exc.strerror))
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise IperfError("another iperf_server.py has held %s for %g s; giving up"
                                 % (self.path, self.timeout))
            time.sleep(0.05)

    def __exit__(self, *exc_info):
        os.close(self.fd)  # closing releases the flock


def read_version(executable):
    """What `iperf3 --version` prints (read once per run: about 2 ms)."""
    try:
        done = run_captured([executable, "--version"], 10)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IperfError("cannot run %s --version: %s" % (executable, exc))


def check_legacy_clients(executable, version):
    """Refuse --legacy-clients where iperf3 has no --use-pkcs1-padding (before 3.17 it pads
    logins the old way already, and there is nothing to switch)."""
    if version is None or version < PKCS1_PADDING_SINCE:
        raise UsageError("--legacy-clients needs iperf3 3.17 or newer (%s is %s, which already "
                         "speaks the PKCS#1 padding of older clients)"
                         % (executable, version_text(version)))


def check_auth_files(executable, version_output, private_key, users_file):
    """Refuse to start an authenticating daemon that would fail after forking, where iperf3
    says nothing: no authentication in this build, missing or unreadable files, or a private
    key others can read."""
    if "authentication" not in version_output.split("Optional features", 1)[-1]:
        raise IperfError("%s was built without authentication (its --version does not list "
                         "it): install an OpenSSL build of iperf3 3.2 or newer" % executable)
    for path in (private_key, users_file):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise IperfError("cannot read %s: %s" % (path, exc.strerror))
    if os.stat(private_key).st_mode & 0o077:
        raise IperfError("private key %s is readable by others: chmod 600 %s"
                         % (private_key, private_key))


def ask_password(stdin):
    """The password from the terminal without echo, or the first line of a non-terminal stdin."""
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            raise UsageError("the passwords differ")
        return first
    return stdin.readline().rstrip("\r\n")


def add_user(users_file, username, password):
    """Add or replace `username` in iperf3's authorized users file (created 0600, atomically).
    Returns True when an entry was replaced."""
    check_credentials(username, password)
    owner = None
    try:
        with open(users_file) as handle:
            lines = handle.read().splitlines()
            info = os.fstat(handle.fileno())
            owner = (info.st_uid, info.st_gid)
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeError) as exc:
        raise IperfError("cannot read %s: %s" % (users_file, getattr(exc, "strerror", exc)))
    replaced = any(line.split(",", 1)[0].strip() == username for line in lines)
    text = "\n".join(users_file_with(lines, username, password_hash(username, password))) + "\n"
    try:
        write_file_atomically(users_file, text, mode=0o600, owner=owner)
    except OSError as exc:
        raise IperfError("cannot write %s: %s" % (users_file, exc.strerror))
    return replaced


def make_keys(folder, openssl=OPENSSL_EXECUTABLE):
    """Create folder/private.pem (0600) and folder/public.pem with openssl; never overwrite.
    Returns the two paths."""
    if shutil.which(openssl) is None:
        raise IperfError("%s not found: install it (e.g. apt-get install openssl)" % openssl)
    private, public = (os.path.join(folder, name) for name in ("private.pem", "public.pem"))
    for path in (private, public):
        if os.path.lexists(path):
            raise IperfError("%s exists: not overwriting a key" % path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise IperfError("cannot create %s: %s" % (folder, exc.strerror))
    made = []
    try:
        # mkstemp files are 0600 before openssl writes a byte into them.
        for path in (private, public):
            fd, temporary = tempfile.mkstemp(dir=folder, prefix=".key.")
            os.close(fd)
            made.append(temporary)
        commands = [[openssl, "genrsa", "-out", made[0], "2048"],
                    [openssl, "rsa", "-in", made[0], "-pubout", "-out", made[1]]]
        for command in commands:
            done = run_captured(command, 60)
            if done.returncode != 0:
                said = done.stderr.strip().splitlines()
                raise IperfError("%s failed: %s" % (" ".join(command[:2]),
                                                    said[-1] if said else done.returncode))
        os.chmod(made[1], 0o644)
        # link() fails if the name exists: a key that appeared meanwhile is not overwritten.
        os.link(made[0], private)
        os.link(made[1], public)
    except OSError as exc:
        raise IperfError("cannot write keys in %s: %s" % (folder, exc.strerror or exc))
    finally:
        for temporary in made:
            remove_file(temporary)
    return private, public


# --- Effects: the watchdog ------------------------------------------------------------------------

class Watchdog:
    """Everything one run needs: the settings, the daemon's argv, its files."""

    def __init__(self, executable, pidfile, port, bind, extra, max_busy_minutes, probe,
                 auth=None, legacy_clients=False, version_output=""):
        self.executable = executable
        self.auth = auth
        self.version_output = version_output
        self.version = parse_version(version_output)
        self.pidfile = pidfile
        self.port = port
        self.bind = bind
        self.extra = list(extra)
        self.max_busy_seconds = max_busy_minutes * 60
        self.probe_enabled = probe
        self.state_file = pidfile + ".state"
        self.lock_file = pidfile + ".lock"
        self.legacy_clients = legacy_clients
        self.settings_argv = daemon_argv(executable, pidfile, port, bind, extra, auth,
                                         legacy_clients)
        self.argv = self.argv_for(pidfile, port)
        self.address = probe_address(bind)
        self.alarm = None  # set when the run ends healthy but a person should look

    def argv_for(self, pidfile, port):
        """The whole argv of a daemon of these settings with this pidfile and port."""
        return daemon_argv(self.executable, pidfile, port, self.bind, self.extra, self.auth,
                           self.legacy_clients) + guard_args(self.version, self.extra)

    def find_daemon(self):
        """(pid, argv) of the live iperf3 our pidfile names, else (None, None)."""
        pid = read_pidfile(self.pidfile)
        argv = daemon_argv_of(pid, self.pidfile)
        return (pid, argv) if argv else (None, None)

    def probe(self, address=None, port=None, authenticating=None):
        """Ask the server for a 1 KB test; returns (verdict, detail) as classify_probe does.
        `authenticating`: whether the server checks logins (default: whether ours does)."""
        if authenticating is None:
            authenticating = self.auth is not None
        argv = probe_argv(self.executable, address or self.address, port or self.port)
        try:
            done = run_captured(argv, PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return classify_probe(None, "", "", timed_out=True)
        except OSError as exc:
            return "fail", "cannot run %s: %s" % (self.executable, exc.strerror)
        verdict, detail = classify_probe(done.returncode, done.stdout, done.stderr, False,
                                         authenticating)
        if verdict in ("fail", "dropped") and "unable to send control message" in detail and \
                established_peers(port or self.port):
            # iperf3 3.9 never says "busy": a busy server resets its probe's connection.
            return "busy", "busy running a test (%s)" % detail
        if verdict == "dropped":
            # It took the connection and dropped the login-less probe: alive, if it still
            # listens (a dead one would not).
            if port_listening(address or self.address, port or self.port, None):
                return "ok", "answered (authentication required; it dropped the probe: %s)" \
                    % detail
            return "fail", detail
        return verdict, detail

    def health(self, pid, address=None, port=None, authenticating=None):
        """The probe's (verdict, detail) for our daemon `pid`. A stopped one (SIGSTOP) fails at
        once: the kernel would take the probe's connection and nobody answer it, a probe would
        only wait out PROBE_TIMEOUT. A traced one (`t`) is probed: strace passes through that
        state at every system call, and a daemon under strace still serves."""
        info = process_info(pid)
        if info is not None and info[0] == "T":
            return "fail", "stopped (process state T: SIGSTOP), it cannot answer"
        return self.probe(address, port, authenticating)

    def remember(self, pid, verdict, detail, busy_since=None, busy_peers=(), restarted=False):
        """Keep what the next run needs: the last verdict, since when and with whom the
        server has been busy, and when it was (re)started lately."""
        now = time.time()
        state = read_state(self.state_file)
        restarts = [when for when in state.get("restarts", [])
                    if isinstance(when, (int, float)) and now - when < RESTART_WINDOW]
        try:
            save_state(self.state_file, {
                "pid": pid, "verdict": verdict, "detail": detail, "checked": now,
                "busy_since": busy_since, "busy_peers": sorted(busy_peers),
                "restarts": restarts + [now] if restarted else restarts,
                "wanted": state.get("wanted", []),
            })
        except IperfError as exc:
            # The server itself is fine: only the busy clock and the restart count suffer.
            log.warning("%s: a busy server's age and restart loops go untracked", exc)
        return len(restarts) + 1 if restarted else len(restarts)

    def note_settings(self):
        """Record in the state file that a run asked for these settings now; return the
        settings other runs asked for within SHARED_WINDOW, and whether this run's own were
        among them (then two watchdogs are alive and share the pidfile)."""
        now = time.time()
        state = read_state(self.state_file)
        wanted = [entry for entry in state.get("wanted", [])
                  if isinstance(entry, list) and len(entry) == 2
                  and isinstance(entry[0], list) and isinstance(entry[1], (int, float))
                  and now - entry[1] < SHARED_WINDOW]
        others = [argv for argv, _ in wanted if argv != self.settings_argv]
        seen = len(others) < len(wanted)
        state["wanted"] = [[argv, when] for argv, when in wanted
                           if argv != self.settings_argv] + [[self.settings_argv, now]]
        try:
            save_state(self.state_file, state)
        except IperfError as exc:
            log.warning("%s: a second watchdog sharing this pidfile goes unnoticed", exc)
        return others, seen

    def check_not_shared(self, pid, argv, others, seen):
        """Raise IperfError when the daemon our pidfile names is another watchdog's: it listens
        on another port than ours, or its settings were asked for lately by a run of another
        watchdog while ours were too. Its daemon is left alone."""
        port = option_value(argv, "-p", "--port") or str(IPERF_PORT)
        if port == str(self.port) and not (
                seen and any(same_command(argv, other) for other in others)):
            return
        raise IperfError(
            "pidfile %s is shared with another watchdog: its iperf3 (pid %d, port %s) runs "
            "other settings and is left alone; give each crontab line its own --pidfile (to "
            "change this server's settings instead, stop it first with --stop)"
            % (self.pidfile, pid, port))

    def stop_all(self, reason):
        """Stop the daemon the pidfile names and any of ours that lost its pidfile."""
        pid, _ = self.find_daemon()
        for victim in ([pid] if pid else []) + [p for p in our_daemons(self.pidfile) if p != pid]:
            stop_process(victim, self.pidfile, reason)
        for victim in self.legacy_daemons():
            stop_process(victim, IPERF_PID_FILE, reason)
        remove_file(self.pidfile)

    def legacy_daemons(self):
        """Our daemons on our port that write IPERF_PID_FILE while our pidfile is this port's
        own default: up to version 2.2 a `-p` line's default pidfile was IPERF_PID_FILE, and
        such a daemon is this watchdog's to replace after an upgrade."""
        if self.port == IPERF_PORT or self.pidfile != port_file(IPERF_PID_FILE, self.port):
            return []
        return [pid for pid in our_daemons(IPERF_PID_FILE) if option_value(
            daemon_argv_of(pid, IPERF_PID_FILE) or [], "-p", "--port") == str(self.port)]

    def spawn(self):
        """Start the daemon of our settings; returns its PID (see launch)."""
        self.check_port_can_be_had()  # again: something may have taken it meanwhile
        return self.launch(self.argv, self.pidfile, self.port)

    def launch(self, argv, pidfile, port):
        """Start the daemon `argv` (writing `pidfile`, listening on `port`) and wait until it
        is really up; `-D`'s exit code means nothing (the parent exits 0 before the child
        writes the pidfile or binds the port). Returns its PID, raises IperfError."""
        try:
            done = run_captured(argv, START_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise IperfError("%s did not return within %g s" % (self.executable, START_TIMEOUT))
        except OSError as exc:
            raise IperfError("cannot run %s: %s" % (self.executable, exc.strerror))
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        # iperf3 puts its reason first ("iperf3: parameter error - ..."), then its usage text.
        said = [line for line in said if line.startswith("iperf3:")] or said
        if done.returncode != 0 and said:
            # Refused before forking (a parameter error): no daemon is coming.
            raise IperfError("iperf3 failed to start: %s" % said[0])
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            pid = read_pidfile(pidfile)
            pid = pid if daemon_argv_of(pid, pidfile) else None
            if pid and port_listening(self.address, port, self.bind):
                return pid
            # The parent forked the daemon before it exited: when no process writing our
            # pidfile is left, the daemon died (a --logfile it cannot open, a port it cannot
            # bind), and waiting out START_TIMEOUT would only delay the verdict. A pidfile that
            # names a live daemon spares the scan of every process.
            exited = pid is None and not our_daemons(pidfile)
            if exited or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if said:
            raise IperfError("iperf3 failed to start: %s" % said[0])
        raise IperfError("iperf3 %s; for its own reason, %s" % (
            "exited before it listened on port %d" % port if exited else
            "did not come up within %g s (%s)" % (
                START_TIMEOUT, "no pidfile" if not pid else "not listening on port %d" % port),
            "see its --logfile" if sets_option(argv, "--logfile")
            else "pass -- --logfile /tmp/iperf3.log"))

    def check_port_can_be_had(self):
        """Raise IperfError when the port is taken by anything but our own daemons: checked
        before they are stopped, so that new settings naming a taken port leave the working
        daemon running instead of no server at all."""
        pids = set(our_daemons(self.pidfile))
        ours = {option_value(daemon_argv_of(pid, self.pidfile) or [], "-p", "--port")
                for pid in pids}
        if str(self.port) in ours or self.legacy_daemons() or \
                not port_listening(self.address, self.port, self.bind):
            return
        owner = listener_owner(self.port)
        raise IperfError("port %d is in use by another process (%s): stop it or choose another "
                         "port with -p%s" % (self.port, owner or "not our iperf3",
                                             "; the running iperf3 is left as it is"
                                             if pids else ""))

    def check_can_start(self):
        """Raise IperfError for what would keep our daemon from starting, found before a
        running one is stopped: new settings that cannot work leave the working server alone."""
        if self.auth:
            check_auth_files(self.executable, self.version_output, *self.auth)
        # iperf3 would fork, fail to write its pidfile or its log, and say nothing (3.7 and
        # 3.9 then spin without listening).
        check_writable_folder(os.path.dirname(self.pidfile), "the pidfile")
        logfile = iperf3_logfile(self.extra)
        if logfile and os.path.isabs(logfile):
            check_writable_folder(os.path.dirname(logfile), "iperf3's --logfile")
        self.check_port_can_be_had()

    def start(self, reason):
        self.check_can_start()
        log.warning("starting iperf3: %s", reason)
        self.stop_all(reason)
        pid = self.spawn()
        verdict, detail = self.probe() if self.probe_enabled else ("ok", "not probed")
        if verdict == "fail":
            raise IperfError("iperf3 started (pid %d) but its probe failed: %s" % (pid, detail))
        busy = verdict == "busy"
        recent = self.remember(pid, verdict, detail, time.time() if busy else None,
                               established_peers(self.port) if busy else (), restarted=True)
        log.warning("iperf3 is running (pid %d, port %d)", pid, self.port)
        if recent >= RESTART_ALARM:
            # Each run ends healthy, so nothing else would tell: an iperf3 that dies every
            # minute (two crontab lines sharing a pidfile are refused by check_not_shared).
            self.alarm = ("iperf3 was started %d times in the last %d minutes (last: %s): a "
                          "restart loop?" % (recent, RESTART_WINDOW // 60, reason))
            log.error("%s", self.alarm)
        return pid

    def side_port(self):
        """A port nothing listens on right now, at our address: where new settings are tried."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((self.address, 0))
                return sock.getsockname()[1]
        except OSError as exc:
            raise IperfError("cannot find a free port to try the new settings on: %s"
                             % (exc.strerror or exc))

    def try_settings(self):
        """Start a daemon of our settings on a free side port (its own pidfile beside ours),
        probe it and stop it: raises IperfError, with iperf3's reason, when the new settings
        cannot serve. The working daemon meanwhile goes on serving our port."""
        port, pidfile = self.side_port(), self.pidfile + ".trial"
        try:
            pid = self.launch(self.argv_for(pidfile, port), pidfile, port)
            verdict, detail = self.probe(port=port) if self.probe_enabled else ("ok", "")
            if verdict == "fail":
                raise IperfError("iperf3 started (pid %d) but its probe failed: %s"
                                 % (pid, detail))
        finally:
            for trial in our_daemons(pidfile):
                stop_process(trial, pidfile, "the trial of new settings is over")
            remove_file(pidfile)

    def change_settings(self, pid, argv):
        """Replace the daemon `pid` (running `argv`) with one of our settings, once they are
        proven on a side port; if they are refused, before or after the old daemon stopped,
        the old settings serve the port again and IperfError says why."""
        try:
            self.check_can_start()
            self.try_settings()
        except IperfError as exc:
            verdict, detail = self.probe() if self.probe_enabled else ("ok", "")
            if verdict == "fail":  # the old daemon is no better: it is restarted as it was
                self.restore(argv, "its probe failed: %s" % detail)
            raise IperfError("settings change refused, iperf3 (pid %d) keeps the old "
                             "settings: %s" % (self.find_daemon()[0] or pid, exc))
        try:
            return self.start("settings changed (running: %s; wanted: %s)"
                              % (" ".join(argv), " ".join(self.settings_argv)))
        except IperfError as exc:
            pid = self.restore(argv, "the new settings failed")
            raise IperfError("settings change refused, iperf3 (pid %d) runs the old settings "
                             "again: %s" % (pid, exc))

    def restore(self, argv, reason):
        """Start the daemon `argv` (the old settings) again; returns its PID."""
        log.warning("restarting iperf3 with the old settings: %s", reason)
        self.stop_all(reason)
        pid = self.launch(argv, self.pidfile, self.port)
        self.remember(pid, "ok", "restarted with the old settings", restarted=True)
        return pid

    def why_not_running(self):
        """Why no daemon runs under our pidfile, for the log of the start that follows."""
        stray = our_daemons(self.pidfile)
        if stray:
            return "iperf3 (pid %s) lost its pidfile %s" % (", ".join(map(str, stray)),
                                                            self.pidfile)
        legacy = self.legacy_daemons()
        if legacy:
            return ("iperf3 (pid %s) on port %d writes %s, the pidfile of version 2.2 and "
                    "older; replaced by one writing %s" % (", ".join(map(str, legacy)),
                                                           self.port, IPERF_PID_FILE,
                                                           self.pidfile))
        if os.path.lexists(self.pidfile):
            return "stale pidfile %s (no iperf3 runs under the PID it names)" % self.pidfile
        return "not running"

    def ensure_running(self):
        """The cron job: find the daemon, judge it, and start or restart it when needed."""
        others, seen = self.note_settings()
        pid, argv = self.find_daemon()
        if pid is None:
            return self.start(self.why_not_running())
        if not same_command(argv, self.settings_argv):
            self.check_not_shared(pid, argv, others, seen)
            return self.change_settings(pid, argv)
        if not self.probe_enabled:
            log.debug("iperf3 is running (pid %d); not probed", pid)
            return pid
        verdict, detail = self.health(pid)
        if verdict == "ok":
            self.remember(pid, verdict, detail)
            log.debug("iperf3 is running (pid %d) and %s", pid, detail)
            return pid
        if verdict == "busy":
            state = read_state(self.state_file)
            since = state.get("busy_since") if state.get("pid") == pid else None
            peers = established_peers(self.port)
            if peers and not peers & set(state.get("busy_peers") or []):
                # Busy with other connections than last time: a new test, not a stuck one
                # (back-to-back clients would otherwise add up to --max-busy).
                since = None
            since = since if isinstance(since, (int, float)) else time.time()
            busy_for = time.time() - since
            if busy_for <= self.max_busy_seconds:
                self.remember(pid, verdict, detail, since, peers)
                log.info("iperf3 (pid %d) is busy with a test (for %s)", pid,
                         format_duration(busy_for))
                return pid
            return self.start("busy for %s, longer than --max-busy %g min (stuck?)"
                              % (format_duration(busy_for), self.max_busy_seconds / 60))
        return self.start("iperf3 (pid %d) failed its health probe: %s" % (pid, detail))

    def status(self, compare_settings=True):
        """Return (exit code, one line) for --status; starts and stops nothing.
        `compare_settings`: whether the flags given name the daemon's settings (else an admin
        typed --status without the crontab line's flags, and nothing is known to differ)."""
        pid, argv = self.find_daemon()
        if pid is None:
            stray = our_daemons(self.pidfile)
            if not stray:
                return EXIT_NOT_RUNNING, "iperf3 not running (pidfile %s)" % self.pidfile
            pid = stray[0]
            argv = daemon_argv_of(pid, self.pidfile) or []
        # Report and probe the port the daemon really uses, whatever flags --status was given.
        port_text = option_value(argv, "-p", "--port")
        port = int(port_text) if port_text and port_text.isdigit() else 5201
        uptime = process_uptime(pid)
        head = "iperf3 running: pid %d, port %d, up %s" % (
            pid, port, format_duration(uptime) if uptime is not None else "?")
        if self.probe_enabled:
            # Judged as the daemon runs, whatever flags --status was given.
            verdict, detail = self.health(pid, probe_address(option_value(argv, "-B", "--bind")),
                                          port, "--rsa-private-key-path" in argv)
            when = "probe"
        else:
            state = read_state(self.state_file)
            if state.get("pid") != pid:
                return EXIT_OK, head + ", not probed yet"
            verdict, detail = state.get("verdict"), state.get("detail")
            when = "last probe %s ago" % format_duration(time.time() - state.get("checked", 0))
        notes = []
        if compare_settings and argv and not same_command(argv, self.settings_argv):
            notes.append("its settings differ from these flags")
        lost = pid != read_pidfile(self.pidfile)
        if lost:
            notes.append("pidfile lost")
        tail = "; ".join(["%s: %s" % (when, detail)] + notes)
        code = EXIT_FAILED if verdict == "fail" or lost else EXIT_OK
        return code, "%s, %s" % (head, tail)


# --- Command line ---------------------------------------------------------------------------------

def _minutes(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of minutes: %r" % text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of minutes: %r" % text)
    return value


def _port(text):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("not a TCP port (1-65535): %r" % text)
    return int(text)


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error message (cron mails it; the usage block is noise)."""

    def error(self, message):
        self.exit(EXIT_USAGE, "%s: error: %s (see --help)\n" % (self.prog, message))


def default_file_text(path):
    """How --help names a default file that follows the port."""
    stem, extension = os.path.splitext(path)
    return "%s on port %d, %s-PORT%s on another port" % (path, IPERF_PORT, stem, extension)


def build_parser():
    parser = OneLineParser(
        prog=program_name(),
        description="Keep exactly one healthy iperf3 server running (run it from cron every "
                    "minute). Arguments after -- are passed to iperf3 unchanged.",
        epilog="exit codes: 0 healthy server running, 1 no healthy server could be had, "
               "2 usage; --status: 0 healthy, 1 unhealthy, 3 not running")
    parser.add_argument("--pidfile", help="iperf3's pidfile; give each watchdog its own "
                        "(default: %s)" % default_file_text(IPERF_PID_FILE))
    parser.add_argument("--log-file", help="this script's log (default: %s)"
                        % default_file_text(IPERF_MONITOR_LOG))
    parser.add_argument("--iperf3", default=IPERF_EXECUTABLE, metavar="PATH",
                        help="iperf3 executable (default: %(default)s)")
    parser.add_argument("-p", "--port", type=_port, default=IPERF_PORT,
                        help="listen on this port (default: %(default)s)")
    parser.add_argument("-B", "--bind", default=IPERF_BIND, metavar="ADDR",
                        help="listen on this address only (default: all addresses)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true",
                        help="print one status line and exit 0 (healthy), 1 (unhealthy) or 3 "
                             "(not running); never starts anything")
    action.add_argument("--stop", action="store_true", help="stop the server")
    action.add_argument("--add-user", metavar="NAME",
                        help="add or replace NAME in --authorized-users-path (password from the "
                             "terminal, or the first line of stdin), then exit")
    action.add_argument("--make-keys", metavar="DIR",
                        help="create DIR/private.pem and DIR/public.pem with openssl, then exit")
    parser.add_argument("--rsa-private-key-path", default=RSA_PRIVATE_KEY_PATH, metavar="FILE",
                        help="require authentication: the server's RSA private key "
                             "(with --authorized-users-path)")
    parser.add_argument("--authorized-users-path", default=AUTHORIZED_USERS_PATH, metavar="FILE",
                        help="require authentication: the users file "
                             "(with --rsa-private-key-path)")
    parser.add_argument("--legacy-clients", action="store_true", default=LEGACY_CLIENTS,
                        help="with authentication on iperf3 3.17+: accept the logins of clients "
                             "older than 3.17 (iperf3 --use-pkcs1-padding; 3.21 clients are "
                             "then refused)")
    parser.add_argument("--no-probe", dest="probe", action="store_false", default=HEALTH_PROBE,
                        help="do not run a health probe (a tiny test) against the server")
    parser.add_argument("--max-busy", type=_minutes, default=MAX_BUSY_MINUTES, metavar="MINUTES",
                        help="restart a server that has been busy this long "
                             "(default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (debug: every run, the commands)")
    parser.add_argument("-q", "--quiet", action="count", default=0,
                        help="log less (on a terminal: errors only)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def given_settings(ours):
    """True when our arguments `ours` set one of the daemon's settings (beyond the port, which
    names the server): only then can --status say that the daemon runs other settings."""
    unset = object()
    settings = ("iperf3", "bind", "rsa_private_key_path", "authorized_users_path",
                "legacy_clients")
    # argparse fills in a default only where the namespace has no value yet.
    given = build_parser().parse_args(ours, argparse.Namespace(**dict.fromkeys(settings, unset)))
    return any(getattr(given, name) is not unset for name in settings)


class LogFileHandler(logging.handlers.WatchedFileHandler):
    """The log file, following logrotate's renames, opened without following a symlink planted
    at its name; a write that fails (a full disk) is said once on stderr, then logging to the
    file stops, instead of a traceback per message."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_NOFOLLOW,
                     0o644)
        return os.fdopen(fd, "a", encoding="utf-8", errors="replace")

    def emit(self, record):
        try:  # reopening after a rotation happens outside logging's own error handling
            super().emit(record)
        except Exception:  # noqa: B902 -- whatever it is, a log line is never worth a crash
            self.handleError(record)

    def handleError(self, record):
        error = sys.exc_info()[1]
        self.setLevel(logging.CRITICAL + 10)
        say_warning("cannot write the log %s: %s; not logging there any more"
                    % (self.baseFilename, getattr(error, "strerror", None) or error))


def setup_logging(log_file, verbose, quiet):
    """Log to the file (following logrotate's renames) and, on a terminal, to stderr.

    Returns True when errors already reach stderr through logging.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.addHandler(logging.NullHandler())  # until the file opens: no stray "last resort" lines
    try:
        try:
            file_handler = LogFileHandler(log_file)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(log_file), exist_ok=True)
            file_handler = LogFileHandler(log_file)
    except OSError as exc:
        raise IperfError("cannot write log file %s: %s" % (log_file, exc.strerror))
    file_handler.setFormatter(logging.Formatter(
        LOG_FORMAT, LOG_DATE_FORMAT))
    file_handler.setLevel(level)
    log.addHandler(file_handler)
    if sys.stderr.isatty():
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        console.setLevel(logging.ERROR if quiet else level)
        log.addHandler(console)
        return True
    return False


def resolve_executable(name):
    path = shutil.which(name)
    if path is None:
        raise IperfError("%s not found: install it (e.g. apt-get install iperf3) or pass "
                         "--iperf3 PATH" % name)
    return os.path.abspath(path)


def absolute(path):
    return os.path.abspath(os.path.expanduser(path))


def run_reporting_errors(action):
    """Run a one-off command (not the watchdog); an IperfError becomes one line and exit 1."""
    try:
        action()
        return EXIT_OK
    except UsageError as exc:
        say_error(exc)
        return EXIT_USAGE
    except IperfError as exc:
        say_error(exc)
        return EXIT_FAILED


def add_user_command(parser, args):
    if not args.authorized_users_path:
        parser.error("--add-user needs --authorized-users-path FILE")
    users_file = absolute(args.authorized_users_path)

    def add():
        try:
            password = ask_password(sys.stdin)
        except (EOFError, KeyboardInterrupt):
            raise UsageError("no password given")
        except UnicodeError:
            raise UsageError("the password is not valid text in this locale")
        replaced = add_user(users_file, args.add_user, password)
        print("%s user %s in %s" % ("replaced" if replaced else "added", args.add_user,
                                    users_file))
    return run_reporting_errors(add)


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    """Entry point: parse `argv` (default sys.argv[1:]), act, return the exit code (argparse's
    own exits, --help and usage errors, become return values too)."""
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else \
            EXIT_USAGE


def _main(argv):
    ours, extra = split_extra(argv)
    parser = build_parser()
    args = parser.parse_args(ours)
    args.pidfile = args.pidfile or port_file(IPERF_PID_FILE, args.port)
    args.log_file = args.log_file or port_file(IPERF_MONITOR_LOG, args.port)
    args.settings_given = len(extra) > len(IPERF_EXTRA_ARGS) or given_settings(ours)
    try:
        check_extra_args(extra)
    except UsageError as exc:
        parser.error(str(exc))
    if args.add_user is not None:
        return add_user_command(parser, args)
    if args.make_keys is not None:
        return run_reporting_errors(lambda: print(
            "created %s and %s" % make_keys(absolute(args.make_keys))))
    if bool(args.rsa_private_key_path) != bool(args.authorized_users_path):
        parser.error("--rsa-private-key-path and --authorized-users-path go together")
    if args.legacy_clients and not args.rsa_private_key_path:
        parser.error("--legacy-clients goes with authentication (--rsa-private-key-path)")
    errors_shown = False
    try:
        errors_shown = setup_logging(absolute(args.log_file), args.verbose, args.quiet)
        return watch(args, extra, errors_shown)
    except IperfError as exc:
        log.error("%s", exc)
        if not errors_shown:
            say_error(exc)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 128 + signal.SIGINT
    except OSError as exc:
        where = " %s" % exc.filename if exc.filename else ""
        log.error("%s%s: %s", exc.strerror, where, exc)
        if not errors_shown:
            say_error("%s%s" % (where.strip() + ": " if where else "", exc.strerror or exc))
        return EXIT_FAILED


def watch(args, extra, errors_shown):
    """The watchdog's run, --status or --stop, with the parsed flags; returns the exit code,
    raises IperfError."""
    pidfile = absolute(args.pidfile)
    try:
        os.makedirs(os.path.dirname(pidfile), exist_ok=True)
    except OSError as exc:
        raise IperfError("cannot create the pidfile's folder %s: %s"
                         % (os.path.dirname(pidfile), exc.strerror))
    auth = None
    if args.rsa_private_key_path:
        auth = (absolute(args.rsa_private_key_path), absolute(args.authorized_users_path))
    executable = os.path.expanduser(args.iperf3)
    version_output = ""
    if args.stop or args.status:
        # Stopping and reporting work without iperf3; where it exists, --status compares
        # the daemon's executable with the file the name resolves to, as a run would.
        found = shutil.which(executable)
        executable = os.path.abspath(found) if found else executable
    else:
        executable = resolve_executable(executable)
        version_output = read_version(executable)
        if args.legacy_clients:
            check_legacy_clients(executable, parse_version(version_output))
    watchdog = Watchdog(executable, pidfile, args.port, args.bind, extra, args.max_busy,
                        args.probe, auth, args.legacy_clients, version_output)
    if args.status:
        code, line = watchdog.status(args.settings_given)
        print(line)
        return code
    with FileLock(watchdog.lock_file, LOCK_TIMEOUT):
        if args.stop:
            watchdog.stop_all("--stop")
            remove_file(watchdog.state_file)
            return EXIT_OK
        watchdog.ensure_running()
    if watchdog.alarm and not errors_shown:
        say_warning(watchdog.alarm)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
