#!/usr/bin/env python3
"""Measure a link both ways with iperf3, every few minutes from cron, and never lose a result.

Each run takes one local timestamp, runs a forward test (this host sends to the server) and then a
reverse test (`-R`, the server sends) against each target, and writes into the results folder:

    <prefix><ts>_client.json     the forward test: iperf3's JSON plus a "continuous_iperf" object
    <prefix><ts>_server.json     the reverse test, likewise
    <prefix><ts>_iperf_mon.log   this run's log (every attempt, every command)
    results.csv                  the ledger: one row appended per test

(With several targets, each one's label goes before _client/_server: <prefix><ts>_<label>_...)

Usage:

    iperf_client.py --server 192.0.2.10                    # 2 x 60 s, 30 streams
    iperf_client.py --server 192.0.2.10 -t 10 -P 4 -- -Z   # arguments after -- go to iperf3
    iperf_client.py --server 192.0.2.10 --dry-run          # print the two commands only
    iperf_client.py --targets ~/iperf_targets -t 20        # several servers, one a line
    iperf_client.py --server 192.0.2.10 --udp 50M -t 10    # UDP: loss and jitter at 50 Mbit/s
    iperf_client.py report --since 7d                      # what the link did this week
    iperf_client.py report --since 7d --html week.html     # the same as a page with charts
    iperf_client.py report --check --warn-below 500 --crit-below 100   # a Nagios/Icinga plugin
    iperf_client.py report --check --drop-below 80,60      # ... against the link's own normal
    iperf_client.py -c 192.0.2.10 --prometheus-textfile DIR/iperf.prom # for node_exporter

Crontab line (every five minutes; 2 x duration plus busy waits must fit in the interval):

    (crontab -l ; echo "*/5 * * * * ~/iperf_client.py --server HOST") | crontab -

A good run prints nothing. Exit status: 0 every test succeeded, 1 a test failed, 2 usage or bad
input, 75 another run held the results folder's lock too long (this run is recorded as skipped),
128+N stopped by signal N.
"""

import argparse
import array
import collections
import contextlib
import csv
import codecs
import ctypes
import datetime
import errno
import fcntl
import gc
import gzip
import hashlib
import heapq
import html
import io
import ipaddress
import itertools
import json
import logging
import math
import multiprocessing
import operator
import os
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

__version__ = "2.3.0"  # the project's version: both scripts and the package

# --- Settings an admin may edit (the command-line flags default to these) -------------------------

IPERF_EXECUTABLE = "iperf3"                 # iperf3 executable to run (a name on PATH or a path)
TEST_DURATION = 60                          # length of each test, whole seconds (iperf3 -t)
NUMBER_STREAMS = 30                         # parallel streams per test (iperf3 -P)
IPERF_SERVER = "CHANGE_TO_IP"               # server's address or DNS name (placeholder: refused);
#                                             several, space-separated: HOST, HOST:PORT, [IPv6]:PORT
IPERF_PORT = 5201                           # server's port (iperf3 -p), where a target names none
TARGETS_FILE = None                         # file of targets, one a line: HOST[:PORT] [LABEL]
CLIENT_NAME = ""                            # this host's name in results ("": its host name)
RUN_INTERVAL = 300                          # seconds between runs (the crontab's */5 minutes)
LOCK_WAIT = None                            # seconds to wait for a run holding the folder
#                                             (None: what this run's interval leaves over)
UDP_RATE = None                             # UDP tests at this rate, e.g. "50M" (None: TCP)
RESULTS_DIR = os.path.abspath(os.path.expanduser("~/iperf_results"))  # where results go
FILES_PREFIX = ""                           # prefix of every file a run writes
IPERF_EXTRA_ARGS = []                       # more iperf3 arguments, e.g. ["-Z", "-O", "2"]
RETRIES = 1                                 # retries of a failed test (busy retries not counted)
BUSY_WAIT = 120                             # seconds to keep retrying a busy server
JITTER = 0                                  # random 0..JITTER s sleep before the first test
TIMEOUT_MARGIN = 30                         # hard limit per attempt: duration + omit + this
COMPRESS = False                            # write results as .json.gz (about 10x smaller)
KEEP_DAYS = 0                               # delete raw files older than this (0: keep forever)
PROMETHEUS_TEXTFILE = ""                    # node_exporter textfile for each run ("": none)
USERNAME = None                             # iperf3 user name, when the server authenticates
RSA_PUBLIC_KEY_PATH = None                  # the server's public key, with USERNAME
PASSWORD_FILE = None                        # file whose first line is the password (mode 0600);
#                                             else the IPERF3_PASSWORD environment variable
REPORT_DIRECTION = "both"                   # report --direction: forward, reverse or both
REPORT_FORMAT = "text"                      # report --format: text, csv or json
REPORT_CACHE = True                         # report keeps what it counted beside the ledger, to
#                                             read only new lines next time (--no-cache: False)
RECENT_TESTS = 3                            # report --check --recent: the latest tests that
#                                             --drop-below and --rtt-rise compare
BASELINE_SPAN = "7d"                        # report --check --baseline: the span before them
#                                             that is the link's normal
CONSECUTIVE_TESTS = 3                       # report --check --consecutive: a relative alert
#                                             needs this many tests in a row


# --- Constants: the run ---------------------------------------------------------------------------

SCRIPT_NAME = "iperf_client.py"  # program_name() when run by another name than iperf*
PLACEHOLDER_SERVER = "CHANGE_TO_IP"
SUMMARY_RULE = "- - - - - - - - - - - - - - - - - - - - - - - - -"  # iperf3's text: totals below
UDP_DATAGRAM = 1460                         # bytes of iperf3's usual UDP datagram (-l)
UDP_MIN_DATAGRAMS = 100                     # --udp refuses a rate sending fewer in a test
TEST_SETUP = 2.0                            # seconds a test takes beyond -t (connect, results)
BUSY_DELAY = (5.0, 30.0)                    # random pause between busy retries (min, max) s
KILL_GRACE = 5.0                            # seconds from SIGTERM to SIGKILL for a late iperf3
VERSION_TIMEOUT = 5.0                       # seconds `iperf3 --version` may take
TIMESTAMP_FORMAT = "%Y%m%d_%H%M%S"
# direction -> (file suffix, extra iperf3 flag); forward runs first.
DIRECTIONS = (("forward", "_client.json", []), ("reverse", "_server.json", ["-R"]))
EX_TEMPFAIL = 75
EX_CANTCREAT = 73  # the tests ran and their files are written, but the ledger refused their rows
TARGETS_FILE_LIMIT = 1024 * 1024  # a targets file larger than this is no targets file
PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]*$")
BUSY_MARK = "server is busy"
# Options this script sets itself; in extra arguments they would break the run or its parsing.
OWNED_SHORT = "cptPRJnk"
OWNED_LONG = ("client", "port", "time", "parallel", "reverse", "json", "json-stream", "logfile",
              "username", "rsa-public-key-path",
              # Ruled out: a test timed by bytes (-n/-k) outruns the hard limit, and --bidir
              # mixes both directions into the figures the ledger reads.
              "bytes", "blockcount", "bidir")
PASSWORD_VARIABLE = "IPERF3_PASSWORD"  # the only way iperf3 takes a password without a prompt
CONTROL_CLOSED_MARK = "control socket has closed unexpectedly"
CREDENTIAL_LIMIT, CREDENTIAL_LIMIT_UNTIL = 20, (3, 8)  # characters, in iperf3 before 3.8
PKCS1_PADDING_SINCE = (3, 17)  # iperf3 pads logins with OAEP from 3.17 (older sides: PKCS#1)
# iperf3 3.9 never says "busy": its connection to a busy server is reset or broken instead.
HIDDEN_BUSY_MARKS = ("unable to send control message: Connection reset by peer",
                     "unable to send control message: Broken pipe")
HIDDEN_BUSY_VERSIONS = ((3, 8), (3, 10))  # the versions seen to hide it (3.9; 3.7 does not)
# iperf3's short options that take a value (from its getopt string), to tell "-B10.0.0.1" apart
# from bundled flags such as "-ZR".
SHORT_WITH_VALUE = "pficbtnklPwBMSLOFATCIX"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a symlink planted at a file's name is not followed
# What one run reads, explicit: run(), run_tests() and run_test() take it, never the flags'
# namespace. run_settings() builds it from the flags, whose defaults are the settings above.
RunSettings = collections.namedtuple("RunSettings", (
    "iperf3", "targets", "client", "protocol", "interval", "lock_wait", "duration", "streams",
    "extra", "iperf3_env", "username", "results_dir", "prefix", "retries", "busy_wait", "jitter",
    "timeout_margin", "compress", "keep_days", "prometheus_textfile", "quiet", "iperf3_version"))


# --- Constants: the ledger and the result files ---------------------------------------------------

LEDGER_NAME = "results.csv"                 # the ledger's file name in the results folder
LOCK_NAME = ".lock"                         # the lock file's name in the results folder
LEDGER_LOCK_NAME = ".ledger.lock"           # held while the ledger is appended to or replaced
LEDGER_LOCK_WAIT = 60.0                     # seconds an append waits for it (a --rebuild holds it)
# The columns of version 2.1, which every ledger has, and those added since, at the end; a
# ledger written before them is read with those cells empty, and a run gives it the new columns.
BASE_COLUMNS = (
    "timestamp", "run", "prefix", "direction", "server", "port", "streams", "duration", "status",
    "error", "sent_bps", "received_bps", "retransmits", "attempts", "file",
)
ADDED_COLUMNS = (
    "client", "label",                                  # 2.2: many links (client -> server)
    "protocol", "min_rtt_ms", "mean_rtt_ms",            # 2.2: latency under load
    "jitter_ms", "lost_percent", "lost_packets", "packets",  # 2.2: UDP tests
)
LEDGER_COLUMNS = BASE_COLUMNS + ADDED_COLUMNS
STATUSES = ("ok", "error", "skipped")  # skipped: the run never started (the folder was busy)
# A ledger row, on the run side as on the report side, is a list of strings in the order of
# LEDGER_COLUMNS, and Col names each position: row[Col.DIRECTION], row[Col.RECEIVED_BPS]. (The
# ledger file may order its columns otherwise: it is read by its header, see read_ledger.)
Col = type("Col", (), {name.upper(): index for index, name in enumerate(LEDGER_COLUMNS)})
NUMBER_COLUMNS = ("port", "streams", "duration", "sent_bps", "received_bps", "retransmits",
                  "attempts", "min_rtt_ms", "mean_rtt_ms", "jitter_ms", "lost_percent",
                  "lost_packets", "packets")
NUMBER_POSITIONS = [LEDGER_COLUMNS.index(column) for column in NUMBER_COLUMNS]
# <prefix><ts>[_<label>]_client.json[.gz]: a run of several targets names each in its files.
RESULT_NAME_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9._-]*?)(?P<run>\d{8}_\d{6})"
                            r"(?:_(?P<label>[A-Za-z0-9][A-Za-z0-9._-]*?))?"
                            r"_(?P<side>client|server)\.json(?P<gz>\.gz)?$")
RUN_FILE_RE = (r"^%s(?P<run>\d{8}_\d{6})(?:_[A-Za-z0-9][A-Za-z0-9._-]*?)?"
               r"(?:_client\.json|_server\.json|_iperf_mon\.log)(?:\.gz)?$")
LABEL_MAX = 64  # characters of a label: with a prefix, the run's time and a side, a file name
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,%d}$" % (LABEL_MAX - 1))
QUICK_HEAD = 16 * 1024     # our metadata and iperf3's "start" lie in a file's first bytes
QUICK_TAIL = 128 * 1024    # iperf3's "end" (with every stream's summary) in its last bytes
_META_RE = re.compile(r'\A\s*\{\s*"continuous_iperf"\s*:\s*(?=\{)')
_TIMESECS_RE = re.compile(r'"timestamp"\s*:\s*\{[^{}]*?"timesecs"\s*:\s*(\d+)\s*[,}]')
_END_RE = re.compile(r'"end"\s*:\s*(?=\{)')
_AFTER_END_RE = re.compile(r'\s*(?:,\s*"error"\s*:\s*("(?:[^"\\]|\\.)*")\s*)?\}\s*\Z')

REPORT_CHUNK = 1 << 18      # bytes of ledger lines parsed at a time (more: more memory, no faster)
CLIENT_LOOKBACK = 64000     # rows read back from a ledger's end for its latest client name
REPORT_CACHE_DIR = ".report-cache"  # in a results folder: what reports counted (ReportCache)
REPORT_CACHE_MIN_BYTES = 1 << 20    # a smaller ledger is read whole in well under a second
REPORT_CACHES_KEPT = 16             # selections (filters) whose cache a folder keeps
_CACHE_NAME_RE = re.compile(r"^[0-9a-f]{20}$")


# --- Constants: the reports -----------------------------------------------------------------------

SPAN_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
SPAN_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SUMMARY_KEYS = ("count", "ok", "failed", "skipped", "min_bps", "p5_bps", "median_bps", "mean_bps",
                "p95_bps", "max_bps", "retransmits", "median_rtt_ms", "median_min_rtt_ms",
                "added_delay_ms", "latency_grade", "median_jitter_ms", "median_lost_percent",
                "lost_percent",
                "bytes", "test_seconds")
# A row whose cells, joined by \x1f, match this needs no escaping: its number cells are JSON
# numbers or empty, its string cells hold no quote, backslash or control character.
_ROW_OK_RE = re.compile("\x1f".join(
    r"(?:-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?)?" if c in NUMBER_COLUMNS
    else r'[^"\\\x00-\x1f]*' for c in LEDGER_COLUMNS) + r"\Z")
# One ledger row as a JSON object, string cells known to need no escaping, number cells valid.
_RUN_TEMPLATE = "{" + ",".join(
    '"%s":%s' % (c, "%s" if c in NUMBER_COLUMNS else '"%s"') for c in LEDGER_COLUMNS) + "}"
# What an empty cell becomes in _RUN_TEMPLATE: null in a number column, "" in a string column.
_EMPTY_CELL_AS = tuple("null" if column in NUMBER_COLUMNS else "" for column in LEDGER_COLUMNS)
# The bufferbloat grade of the delay a test's own load adds (mean RTT minus base RTT), on the
# DSLReports scale (also 8x8's and LibreQoS's): (grade, the added delay in ms it stays under).
# Approximate from iperf3's figures: its min RTT is a smoothed sample and no idle probe is taken,
# so the base reads high under a standing queue and the grade errs towards the better one.
LATENCY_GRADES = (("A+", 5.0), ("A", 30.0), ("B", 60.0), ("C", 200.0), ("D", 400.0))
LATENCY_GRADE_WORST = "F"   # 400 ms or more
SERVER_UNKNOWN = "server unknown"  # a link of failed tests whose server no file names
FUTURE_SLACK = 300          # seconds a test may seem to lie ahead (clocks of two hosts differ)
# Names of a file this process already has open: streamed into, never replaced (a rename over
# /dev/stdout would replace the link, or clobber a file the shell opened for appending).
_OPEN_FILE_ALIAS_RE = re.compile(r"^/(?:dev/std(?:out|err)$|dev/fd/|proc/(?:self|\d+)/fd/)")


# --- Constants: the HTML report -------------------------------------------------------------------

# direction -> (line colour, dash pattern, bar fill): told apart by lightness and dashes as well as
# by hue (dark blue and vermillion from the Okabe-Ito palette), so grey-scale prints and
# colour-blind readers keep them apart; labels name them too.
DIRECTION_STYLE = {"forward": ("#08306b", "", "#08306b"),
                   "reverse": ("#d55e00", "7 4", "#f6c3a0")}
DIRECTION_LABEL = {"forward": "forward (this host sends)", "reverse": "reverse (server sends)"}
GAP_FACTOR = 3       # a pause over 3 usual intervals between tests breaks the line: no test ran
MAX_POINTS = 1500    # more tests per direction are drawn as medians of equal time slots
LINK_MIN_POINTS = 300  # a page of several links: MAX_POINTS shared out, at least this per chart
SVG_WIDTH = 760
FAILURE_STEP = 4     # pixels between two failure crosses of a chart (the failures between, counted)
TIME_STEPS = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 2 * 86400,
              7 * 86400, 14 * 86400, 28 * 86400)
HTML_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#111;
background:#fff;margin:0 auto;max-width:1200px;padding:0 12px 24px;line-height:1.4}
h1{font-size:1.4em;margin:16px 0 4px}h2{font-size:1.15em;margin:24px 0 6px}
p.meta{margin:2px 0;color:#333}.wide{overflow-x:auto}
svg{display:block;width:100%;height:auto;min-width:480px}
svg text{font-size:12px;fill:#222}svg .small{font-size:10.5px}
svg .grid{stroke:#ddd;stroke-width:1}svg .axis{stroke:#555;stroke-width:1}
svg .series{fill:none;stroke-width:1.8;stroke-linejoin:round}
svg .median{stroke-width:1.2;stroke-dasharray:2 3}svg .failure{stroke-width:2}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:4px 0}
th,td{padding:3px 8px;border-bottom:1px solid #ccc;text-align:right;vertical-align:top;
white-space:nowrap}th:first-child,td:first-child,.text{text-align:left}
td.wrap{white-space:normal;min-width:16em}td.bad{color:#b00}
h2.link{border-top:2px solid #08306b;padding-top:10px;margin-top:32px}h3{font-size:1.05em}
th.server{text-align:center}
"""


# --- Constants: the Prometheus textfile and the monitoring check ----------------------------------

# (metric, ledger column or None, help): the node_exporter textfile-collector format.
PROMETHEUS_METRICS = (
    ("iperf_received_bits_per_second", "received_bps",
     "Receiver's goodput of the latest test (iperf3 end.sum_received), bits/s."),
    ("iperf_sent_bits_per_second", "sent_bps",
     "Sender's throughput of the latest test (iperf3 end.sum_sent), bits/s."),
    ("iperf_retransmits", "retransmits",
     "TCP retransmits of the latest test (iperf3 end.sum_sent.retransmits)."),
    ("iperf_rtt_seconds", "mean_rtt_ms",
     "RTT under load of the latest test: the mean of its streams' mean RTT (sender's sockets), "
     "seconds."),
    ("iperf_min_rtt_seconds", "min_rtt_ms",
     "Lowest RTT seen by the latest test's streams (the base latency), seconds."),
    ("iperf_jitter_seconds", "jitter_ms",
     "UDP jitter of the latest test (iperf3's running estimate, RFC 1889), seconds."),
    ("iperf_lost_ratio", "lost_percent", "UDP packets lost in the latest test, 0 to 1."),
    ("iperf_added_delay_seconds", None,
     "Delay the latest test's own load added: its mean RTT minus its lowest RTT, seconds "
     "(approximate: iperf3's lowest RTT is a smoothed figure and no idle probe is taken)."),
    ("iperf_latency_grade", None,
     "1 for the grade (label grade, A+ to F, the DSLReports bufferbloat scale) of the latest "
     "test's added delay; approximate, see iperf_added_delay_seconds."),
    ("iperf_success", "status", "1 when the latest test succeeded, 0 when it failed."),
    ("iperf_consecutive_failures", None,
     "Failed tests in a row up to the latest one (0 after a success), as counted in this file."),
    ("iperf_last_run_timestamp_seconds", "timestamp",
     "Start of the latest run (its first test), Unix seconds."),
)
# The figures of the latest test, and their factor from the ledger's unit (ms, %) to the
# metric's base unit (Prometheus names seconds and ratios).
PROMETHEUS_VALUES = ((0, 1), (1, 1), (2, 1), (3, 1e-3), (4, 1e-3), (5, 1e-3), (6, 1e-2))
# client: the ledger's client column (the run's --client-name); label: the target's label.
# protocol: only "udp" is said (TCP's series keep the labels of 2.2); grade: the grade's only.
PROMETHEUS_LABELS = ("client", "label", "server", "port", "protocol", "direction", "grade")
_PROM_SAMPLE_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)\s*$")
_PROM_LABEL_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')
CHECK_EXIT = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}
CHECK_RANK = ("OK", "UNKNOWN", "WARNING", "CRITICAL")  # the worst state wins
MAX_AGE_RUNS = 3            # default --max-age: this many usual intervals between runs
MAX_AGE_FALLBACK = 15.0     # minutes, when the ledger holds too few runs to tell the interval
CHECK_REACH = 86400         # --check judges the links tested in the ledger's latest day
INTERVAL_ROWS = 2000        # the usual interval is read from the ledger's latest rows

log = logging.getLogger("iperf_client")


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

class LedgerError(IperfError):
    """The ledger is missing or damaged: `report --rebuild` is the remedy."""


class Terminated(Exception):
    """SIGTERM arrived during a report: unwinds it like Ctrl-C does (see report_main)."""


# --- iperf3: pure helpers (arguments, results, versions) ------------------------------------------

def omit_seconds(args):
    """The `-O/--omit` seconds found in iperf3 arguments (0 when absent or unreadable), in any
    spelling getopt takes: `-O 2`, `-O2`, `-ZO2`, `--omit 2`, `--omit=2`."""
    value = None
    for index, arg in enumerate(args):
        if arg == "--omit" and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith("--omit="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-") and not arg.startswith("--"):
            for position, char in enumerate(arg[1:], start=1):
                if char == "O":
                    rest = arg[position + 1:]
                    value = rest if rest else (args[index + 1] if index + 1 < len(args) else None)
                    break
                if char in SHORT_WITH_VALUE:
                    break
    try:
        return max(0, int(float(value))) if value is not None else 0
    except ValueError:
        return 0


def iperf3_argv(executable, server, port, duration, streams, reverse=False, extra=(),
                server_output=False):
    """The argv of one test: JSON on stdout (never --logfile: a retry would append to it).
    With `server_output`, the server's own result comes back in it (a reverse test's RTT)."""
    argv = [executable, "-c", server, "-p", str(port), "-t", str(duration), "-P", str(streams),
            "-J"]
    if reverse:
        argv.append("-R")
    if server_output:
        argv.append("--get-server-output")
    return argv + list(extra)


def trim_server_output(document):
    """Keep only "start" and "end" of the server's JSON result in a test's document (its
    intervals repeat, from the other side, what the client's own hold: they would double the
    file; the end holds the server's RTT figures), or the summary of its text result.
    Returns the document."""
    server = document.get("server_output_json")
    if isinstance(server, dict) and "intervals" in server:
        document["server_output_json"] = {key: server[key] for key in ("start", "end", "error")
                                          if key in server}
    text = document.get("server_output_text")
    if isinstance(text, str) and SUMMARY_RULE in text:
        # A daemon without --json: no RTT in its text; its summary is what the text adds.
        document["server_output_text"] = text[text.rindex(SUMMARY_RULE):]
    return document


Target = collections.namedtuple("Target", ("host", "port", "label"))
_HOST_RE = re.compile(r"^[A-Za-z0-9_:][A-Za-z0-9._%:-]*$")  # a name, IPv4, IPv6 (with %zone)


def parse_target(text, default_port):
    """One target, `[LABEL=]HOST`, `HOST:PORT`, `[IPv6]:PORT`, `[IPv6]` or a bare IPv6 address,
    -> Target (label "" when none is given). Raises ValueError saying what is wrong."""
    label, _, address = text.strip().rpartition("=")
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or ":" not in host or (rest and not rest.startswith(":")):
            raise ValueError("%r is not [IPv6] or [IPv6]:PORT" % text)
        port = rest[1:] if rest else None
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, None  # a name, IPv4, or a bare IPv6 address (two or more ':')
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        # It would go into the ledger's cells and the reports' lines as it is.
        raise ValueError("%r holds a control character" % text)
    if ":" in host and not _is_ipv6(host):
        raise ValueError("%r is not HOST:PORT, [IPv6]:PORT or an IPv6 address" % text)
    if not _HOST_RE.match(host) or host == PLACEHOLDER_SERVER:
        raise ValueError("%r is not a host name or address" % text if host != PLACEHOLDER_SERVER
                         else "no server configured (%s is the placeholder)" % host)
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("%r: %r is not a port number (1-65535)" % (text, port))
    if label and not LABEL_RE.match(label):
        raise ValueError("%r: label %r may only hold letters, digits, '.', '_' and '-' (at most "
                         "64, starting with a letter or digit)" % (text, label))
    return Target(host, int(port) if port else default_port, label)


def _is_ipv6(host):
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])  # a %zone is the host's business
        return True
    except ValueError:
        return False


def default_label(target, default_port):
    """A target's label in file names when none is given: its host (an IPv6 address's ':' and
    '%' made '-'), and its port when that is not the default one. At most LABEL_MAX characters
    (a label may have no more): a longer one (a DNS name may have 253) is cut, and ends in a
    short hash of the whole, so two long names still differ and no file name nears the
    system's 255-byte limit."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", target.host).strip("-._") or "target"
    label = name + ("_%d" % target.port if target.port != default_port else "")
    if len(label) <= LABEL_MAX:
        return label
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:8]
    return "%s-%s" % (label[:LABEL_MAX - len(digest) - 1].rstrip("-._"), digest)


def parse_targets_file(lines, default_port, source):
    """Targets of a targets file's lines: `HOST[:PORT] [LABEL]`, `#` starts a comment, blank
    lines are skipped. Raises ValueError naming `source` and the line."""
    targets = []
    for number, line in enumerate(lines, start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            if len(words) > 2 or "=" in words[0]:
                raise ValueError("expected HOST[:PORT] [LABEL], found %r" % line.strip())
            target = parse_target(words[0], default_port)
            if len(words) == 2:
                target = parse_target("%s=%s" % (words[1], words[0]), default_port)
        except ValueError as exc:
            raise ValueError("%s line %d: %s" % (source, number, exc))
        targets.append(target)
    if not targets:
        raise ValueError("%s names no target" % source)
    return targets


def labelled_targets(targets, default_port):
    """The targets with every label set (see default_label); raises ValueError when two are the
    same server and port, or share a label (their files would collide)."""
    labelled, addresses, labels = [], set(), {}
    for target in targets:
        target = target._replace(label=target.label or default_label(target, default_port))
        name = target_name(target.host, target.port)
        if (target.host, target.port) in addresses:
            raise ValueError("target %s is given twice" % name)
        if target.label in labels:
            raise ValueError("targets %s and %s share the label %r: give each its own" % (
                labels[target.label], name, target.label))
        addresses.add((target.host, target.port))
        labels[target.label] = name
        labelled.append(target)
    return labelled


def target_name(host, port):
    """HOST:PORT as people write it ([IPv6]:PORT)."""
    return ("[%s]:%s" if ":" in host else "%s:%s") % (host, port)


def command_line(argv):
    """A shell-quoted command line for logs and metadata (no secret ever travels in argv)."""
    return " ".join(shlex.quote(str(arg)) for arg in argv)


def auth_argv(username, public_key):
    """iperf3's client authentication options; the password never goes into argv (every user
    sees argv in `ps`), only into iperf3's environment."""
    return ["--username", username, "--rsa-public-key-path", public_key] if username else []


def parse_json_output(text):
    """Return the first JSON object in iperf3's output, or None.

    Warnings can precede the document and an "iperf3: error - ..." line can follow it, so this
    decodes from the first `{` and ignores what follows. A later `{` at a line start is tried when
    the first one is noise (a brace inside a warning), a few times at most.
    """
    decoder = json.JSONDecoder()
    starts = [text.find("{")]
    starts += [m.start() + 1 for m in re.finditer(r"\n\{", text)][:5]
    for start in starts:
        if start < 0:
            continue
        try:
            document, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(document, dict):
            return document
    return None


_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text):
    """`text` with each control character but tab and line break written as \\xNN: ledger
    cells (an error text, a label, a client name) are anyone's text, and an ESC or a BEL must
    not reach a terminal or a monitoring view as it is. Used where text reports and the
    check's line are printed."""
    return _CONTROL_RE.sub(lambda match: "\\x%02x" % ord(match.group()), text)


def plain_number(value):
    """A number as people write it: `60` rather than `60.0`, `2.5` stays `2.5` (seconds, bits/s,
    percentages alike)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _version_text(version):
    return ".".join(map(str, version)) if version else "(version unknown)"


def result_document(stdout, stderr, returncode, timed_out=None, stopped_by=None, failure=None):
    """Build a test's result document from one iperf3 attempt.

    Given iperf3's stdout/stderr text and exit code, the hard limit in seconds when it ended the
    attempt, the signal name that stopped the script, or `failure` (why iperf3 could not start).
    Returns iperf3's own JSON when it printed one, else {"error": ...}; our reason for ending the
    attempt comes first in "error", followed by iperf3's own message. A document without the
    figures the ledger reads always carries an "error" (see missing_result_error).
    """
    document = parse_json_output(stdout or "")
    own_error = None
    if document is None:
        if failure:
            own_error = failure
        else:
            # A half document (a crash) is not worth quoting; a plain-text message is.
            detail = one_line(stderr or "")
            if not detail and "{" not in (stdout or ""):
                detail = one_line(stdout or "")
            what = "an incomplete" if "{" in (stdout or "") else "no"
            own_error = "iperf3 printed %s JSON result (exit code %s)%s" % (
                what, returncode, ": " + detail if detail else "")
        document = {}
    reasons = []
    if timed_out is not None:
        reasons.append("timed out after %s s" % plain_number(timed_out))
    if stopped_by:
        reasons.append("interrupted by %s" % stopped_by)
    if own_error:
        reasons.append(own_error)
    if "error" in document:
        reasons.append(str(document["error"]))
    elif not reasons:
        missing = missing_result_error(document, returncode, stderr)
        if missing:
            reasons.append(missing)
    if reasons:
        document["error"] = "; ".join(reasons)
    return document


def summaries(document):
    """The (sent, received) summaries of iperf3's "end" that the ledger reads ({} where absent).

    TCP tests have "sum_sent" and "sum_received"; UDP tests of iperf3 3.9 and older have only one
    "sum" (the receiver's view), which then stands for both.
    """
    end = document.get("end")
    end = end if isinstance(end, dict) else {}
    parts = [end.get("sum_sent"), end.get("sum_received")]
    if parts == [None, None]:
        parts = [end.get("sum")] * 2
    return tuple(part if isinstance(part, dict) else {} for part in parts)


def has_figures(document):
    """True when both summaries the ledger reads carry a rate (a finite number)."""
    rates = [part.get("bits_per_second") for part in summaries(document)]
    return all(_finite(rate) is not None for rate in rates)


def missing_result_error(document, returncode, stderr=""):
    """The error of a document that has no "error" but lacks the figures the ledger reads,
    else None.

    iperf3 3.9 prints a document with an empty "end" and no "error" when the server is down or
    refused the login (its message goes to stderr), and exits 0 or 1 on errors depending on the
    version: neither the "error" key nor the exit code can be trusted alone, the figures can.
    """
    if "error" in document or has_figures(document):
        return None
    return stderr_message(stderr) or "iperf3 reported no result (exit %s)" % (
        "?" if returncode is None else returncode)


def is_busy(document, version=None):
    """True when the server answered that it is busy with another client's test; with an
    iperf3 that hides it (HIDDEN_BUSY_VERSIONS), also when the connection was reset or broken
    as the test began."""
    error = str(document.get("error", ""))
    if BUSY_MARK in error:
        return True
    low, high = HIDDEN_BUSY_VERSIONS
    return (version is not None and low <= version[:2] < high
            and any(mark in error for mark in HIDDEN_BUSY_MARKS))


def explain_error(error, stderr="", version=None, logged_in=False):
    """A failed test's error as one line for a person; a refused login says what to check.

    Versions refuse a login in different words: "test authorization failed" (3.7-3.18, 3.9 on
    stderr only), or a closed control connection (3.21 servers). `version` is this host's
    iperf3, `logged_in` whether the test carried credentials, `stderr` what iperf3 printed there.
    """
    text = one_line(error)
    said = "%s %s" % (text, stderr or "")
    if logged_in and "output buffer too small" in said:
        return ("iperf3 %s cannot log in at all: with this OpenSSL its client sends an empty "
                "login (a bug of iperf3 3.16-3.20, esnet/iperf issue 1951, fixed in 3.21): use "
                "another iperf3 on this host (3.21+, or 3.12 and older with a server older than "
                "3.17): %s" % (_version_text(version), text))
    refused = "authorization failed" in said or (logged_in and CONTROL_CLOSED_MARK in said)
    if not refused:
        return text
    if not logged_in:
        return ("the server requires a login: give --username, --rsa-public-key-path and a "
                "password: %s" % text)
    if version is not None and version >= PKCS1_PADDING_SINCE:
        padding = ("a server older than iperf3 3.17 cannot read the OAEP padding of this "
                   "iperf3 %s, and no flag changes it: use iperf3 3.17+ on the server or an "
                   "iperf3 older than 3.16 here" % _version_text(version))
    else:
        padding = ("if the server runs iperf3 3.17 or newer, it refuses clients older than "
                   "3.17 unless it runs with --use-pkcs1-padding (iperf_server.py "
                   "--legacy-clients)")
    return ("login refused by the server (wrong user name or password, the wrong public key, "
            "this host's clock more than the server's --time-skew-threshold (10 s) off, or %s): "
            "%s" % (padding, text))


def with_metadata(document, meta):
    """The result document as its file holds it: our metadata first and iperf3's "error" (when
    there is one) last, right after its "end", as iperf3 writes it: the ledger's rebuild reads
    a file's head and tail only."""
    items = [("continuous_iperf", meta)] + [i for i in document.items() if i[0] != "error"]
    if "error" in document:
        items.append(("error", document["error"]))
    return dict(items)


def encode_result(document):
    """A result document as the bytes of its file: compact JSON (a year of files is large)."""
    return json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n"


def result_name(prefix, run_ts, suffix, compress, label=""):
    """<prefix><ts>[_<label>]<suffix>[.gz]: the label only when a run tests several targets."""
    return prefix + run_ts + ("_" + label if label else "") + suffix + (".gz" if compress else "")


def _dig(document, *keys):
    for key in keys:
        if not isinstance(document, dict) or key not in document:
            return None
        document = document[key]
    return document


def _finite(value):
    """A JSON number as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def is_json_number(value):
    """True for a JSON number (an int or a float, not a bool), finite or not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_cell(value):
    """A CSV cell for a number from the JSON: exact repr, empty when absent or not a number."""
    return repr(value) if is_json_number(value) else ""


def iso_time(seconds, utc_offset=None):
    """Unix seconds -> ISO 8601 with the UTC offset, whole seconds ("" when impossible): in
    `utc_offset` seconds east of UTC when given, else in this process's local time."""
    try:
        moment = datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc)
        if is_json_number(utc_offset):
            zone = datetime.timezone(datetime.timedelta(seconds=int(utc_offset)))
            return moment.astimezone(zone).isoformat(timespec="seconds")
        return moment.astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return ""


def local_utc_offset(seconds):
    """This host's UTC offset, in seconds east, at the moment `seconds` (DST included)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).astimezone()
    return int(moment.utcoffset().total_seconds())


# --- iperf3: running it ---------------------------------------------------------------------------

class Stopper:
    """Remembers the first SIGTERM/SIGINT/SIGHUP so the run can stop iperf3 and clean up.

    The handler only records the signal: an exception raised at a random point could cut a
    result file or the ledger in half, so the loops poll `signum` instead.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def install(self):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None

    def sleep(self, seconds):
        """Sleep up to `seconds`, returning early when a signal arrived."""
        deadline = time.monotonic() + seconds
        while self.signum is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))


class CommandResult:
    """What one command did: exit code, output, and why it was ended early, if it was."""

    def __init__(self, returncode=None, stdout="", stderr="", timed_out=None, stopped_by=None,
                 failure=None):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out
        self.stopped_by = stopped_by
        self.failure = failure


def _signal_group(proc, signum):
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent():
    """A preexec_fn that has the kernel SIGKILL the child when this process dies, however it
    dies (SIGKILL included: no handler of ours runs then), so that no iperf3 outlives its hard
    limit or keeps a server busy. Linux only; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)
    return arm


def run_command(argv, limit, env=None, stopper=None, progress=None, grace=KILL_GRACE):
    """Run one command (iperf3) and return a CommandResult; never leaves the process running.

    The argv is logged at DEBUG first. stdin is /dev/null, output captured. The command runs in
    its own session, so a terminal's Ctrl-C reaches only us; after `limit` seconds, or when
    `stopper` saw a signal, its group gets SIGTERM (iperf3 then prints its partial JSON) and,
    `grace` seconds later, SIGKILL. `progress(elapsed)` is called about twice a second.
    """
    log.debug("running: %s", command_line(argv))
    try:
        proc = subprocess.Popen(
            [str(arg) for arg in argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, start_new_session=True, universal_newlines=True,
            errors="replace", preexec_fn=_die_with_parent(),
        )
    except OSError as exc:
        return CommandResult(failure="cannot run %s: %s" % (argv[0], exc.strerror or exc))
    started = time.monotonic()
    result = CommandResult()
    try:
        while True:
            try:
                result.stdout, result.stderr = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - started
            if progress is not None:
                progress(elapsed)
            if stopper is not None and stopper.signum is not None:
                result.stopped_by = stopper.name
            elif elapsed >= limit:
                result.timed_out = limit
            else:
                continue
            log.warning("%s: sending SIGTERM to %s", "stopping" if result.stopped_by
                        else "hard limit of %s s reached" % plain_number(limit), argv[0])
            result.stdout, result.stderr = _end_process(proc, argv[0], grace)
            break
    finally:
        if proc.poll() is None:  # an unexpected exception: still leave nothing behind
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    result.returncode = proc.returncode
    return result


def _end_process(proc, name, grace):
    """SIGTERM to the command's group (iperf3 then prints its partial JSON), SIGKILL `grace`
    seconds later; returns what it printed (stdout, stderr)."""
    _signal_group(proc, signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("%s ignored SIGTERM for %s s: sending SIGKILL", name, grace)
    _signal_group(proc, signal.SIGKILL)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        # Something that left the process group still holds the output pipes.
        log.warning("%s: output still open after SIGKILL; giving up on it", name)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        return "", ""


class Iperf3Version:
    """The version tuple (or None) of one iperf3 executable: calling the object reads
    `--version` the first time it is needed (only for a failed test or a long credential: an
    explanation or a verdict may depend on it, a success's never does), then keeps it. One
    run's (see RunSettings), so nothing outlives the run."""

    def __init__(self, executable):
        self.executable = executable
        self._read = []

    def __call__(self):
        if not self._read:
            outcome = run_command([self.executable, "--version"], VERSION_TIMEOUT)
            self._read.append(parse_version(outcome.stdout))
        return self._read[0]


# --- Files: written whole or not at all, and locks ------------------------------------------------

def file_mode():
    """Mode for results, ledger and logs: the process's umask, but never writable by others.
    Asked for when a file is made: Linux tells the umask in /proc (4.7+); elsewhere it is set
    and set back, which only this moment's caller sees."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            umask = next(int(line.split()[1], 8) for line in status
                         if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask & ~0o002


def _silence_stdout():
    """Point stdout at /dev/null, so that Python's final flush into a closed pipe does not
    complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


def write_atomic(path, data):
    """Write bytes to `path` so a reader sees the old file or the whole new one, never half,
    and never damage what is there (see output_target).

    A temporary file in the same folder, fsync, rename; the temporary file is removed on error.
    A character device or a FIFO gets the bytes streamed into it instead. Raises OSError.
    """
    how, path = output_target(path)
    if how == "stream":
        _stream_into(path, data)
        return
    folder = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, file_mode())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def output_target(path):
    """How write_atomic writes `path`: ("replace", the regular file to replace) or ("stream",
    path) for a character device, a FIFO or this process's own open file (/dev/stdout).

    A symlink to a regular file: the file it names is replaced and the link kept. Anything else
    that exists and is not a regular file (a directory, a socket, a block device, a dangling
    symlink) is never replaced: raises OSError.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise OSError(errno.ENOENT, "it is a symbolic link to nothing: not replaced")
        return "replace", path
    if _OPEN_FILE_ALIAS_RE.match(os.path.abspath(path)) or stat.S_ISCHR(info.st_mode) or \
            stat.S_ISFIFO(info.st_mode):
        return "stream", path
    if stat.S_ISREG(info.st_mode):
        return "replace", os.path.realpath(path) if os.path.islink(path) else path
    kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a socket"
            if stat.S_ISSOCK(info.st_mode) else "a block device" if stat.S_ISBLK(info.st_mode)
            else "not a regular file")
    raise OSError(errno.EEXIST, "it is %s, not a regular file: not replaced" % kind)


def _stream_into(path, data):
    """Write `data` into a device, FIFO or open file; a FIFO without a reader is an error, not
    a hang (cron would wait for ever)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OSError(exc.errno, "a FIFO that no process reads")
        raise
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _fsync_dir(folder):
    """Make a rename into `folder` durable (write_atomic's promise after a crash). Raises
    OSError, but for EINVAL from fsync: a filesystem that cannot fsync a directory (some FUSE
    and network ones) says so, and there a rename is as durable as it can be made."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def locked(path, wait, stopper=None, on_wait=None, flags=os.O_RDWR | os.O_CREAT | O_NOFOLLOW):
    """Open `path` (a lock file, made 0600 with the default `flags`; a folder with O_RDONLY)
    and take an exclusive flock on it: the one way this script locks. Waits up to `wait`
    seconds (None: as long as it takes), calling `on_wait()` first when another holds it; a
    stopper that has seen a signal ends the wait. Returns the open fd (close it to let go), or
    None when the wait ended first. Raises OSError."""
    fd = os.open(path, flags, 0o600)
    try:
        if flock_within(fd, 0):
            return fd
        if on_wait is not None:
            on_wait()
        if wait is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        if flock_within(fd, wait, stopper):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def flock_within(fd, seconds, stopper=None):
    """Take an exclusive flock on `fd`, trying for up to `seconds`; True when taken. A stopper
    that has seen a signal ends the wait."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline or (stopper is not None and stopper.signum is not None):
            return False
        if stopper is not None:
            stopper.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        else:
            time.sleep(0.05)


# --- The ledger: pure helpers ---------------------------------------------------------------------

def ledger_row(document, file_name):
    """The ledger row (a list, see Col) for one result document.

    Reads the "continuous_iperf" metadata this script writes, and iperf3's own keys for the start
    time and the figures. Used after each test and when the ledger is rebuilt from the files.
    """
    meta = document.get("continuous_iperf")
    meta = meta if isinstance(meta, dict) else {}
    start = _dig(document, "start", "timestamp", "timesecs")
    if not is_json_number(start):
        start = meta.get("start")
    error = document.get("error")
    if error is None:
        # A file written before the figures were checked (or by hand): the same verdict.
        error = missing_result_error(document, meta.get("exit_code"))
    sent, received = summaries(document)
    row = {
        # In the zone the test ran in (its metadata says), so a ledger rebuilt elsewhere, or
        # under another TZ, is the same row for row.
        "timestamp": iso_time(start, meta.get("utc_offset")) if is_json_number(start) else "",
        "run": meta.get("run", ""),
        "prefix": meta.get("prefix", ""),
        "direction": meta.get("direction", ""),
        "server": meta.get("server", ""),
        "port": meta.get("port", ""),
        "streams": meta.get("streams", ""),
        "duration": meta.get("duration", ""),
        "status": "error" if error is not None else "ok",
        "error": one_line(error) if error is not None else "",
        "sent_bps": number_cell(sent.get("bits_per_second")),
        "received_bps": number_cell(received.get("bits_per_second")),
        "retransmits": number_cell(sent.get("retransmits")),
        "attempts": meta.get("attempts", ""),
        "file": file_name,
        "client": meta.get("client", ""),
        "label": meta.get("label", ""),
    }
    row.update(test_figures(document, meta))
    return [str(row[column]) if row[column] is not None else "" for column in LEDGER_COLUMNS]


def test_figures(document, meta):
    """The protocol, and the latency and UDP figures of a test, for the ledger: RTT (ms) from
    the sending side's streams (iperf3 reports the kernel's RTT of its own sockets only: in a
    reverse test the client's copies of the server's are zeros, and the server's come with
    --get-server-output from a daemon run with --json, else stay empty), UDP's from `end.sum`."""
    protocol = _dig(document, "start", "test_start", "protocol")
    protocol = protocol.lower() if isinstance(protocol, str) else meta.get("protocol", "")
    figures = dict.fromkeys(ADDED_COLUMNS[3:])
    figures["protocol"] = protocol
    streams = _dig(document, "end", "streams")
    if _dig(document, "start", "test_start", "reverse") == 1 or meta.get("direction") == "reverse":
        streams = _dig(document, "server_output_json", "end", "streams")  # the sender's own
    if protocol == "tcp" and isinstance(streams, list):
        senders = [stream.get("sender") for stream in streams if isinstance(stream, dict)]
        rtts = [(_finite(sender.get("min_rtt")), _finite(sender.get("mean_rtt")))
                for sender in senders if isinstance(sender, dict) and sender.get("sender") is True]
        rtts = [(low, mean) for low, mean in rtts if low and mean]
        if rtts:
            figures["min_rtt_ms"] = repr(min(low for low, _ in rtts) / 1000.0)
            figures["mean_rtt_ms"] = repr(math.fsum(mean for _, mean in rtts) / len(rtts) / 1000.0)
    udp = _dig(document, "end", "sum")
    if protocol == "udp" and isinstance(udp, dict):
        for key in ("jitter_ms", "lost_percent", "lost_packets", "packets"):
            figures[key] = number_cell(udp.get(key))
    return figures


def complete_row(row, document, file_name):
    """Fill what a file without our metadata leaves empty, from iperf3's keys, then the name."""
    named = RESULT_NAME_RE.match(file_name)
    start = document.get("start") if isinstance(document.get("start"), dict) else {}
    test_start = start.get("test_start") if isinstance(start.get("test_start"), dict) else {}
    connecting = start.get("connecting_to") if isinstance(start.get("connecting_to"), dict) else {}
    if not row[Col.DIRECTION]:
        if test_start.get("reverse") in (0, 1):
            row[Col.DIRECTION] = "reverse" if test_start["reverse"] else "forward"
        elif named:
            row[Col.DIRECTION] = "reverse" if named.group("side") == "server" else "forward"
    fill = {Col.SERVER: connecting.get("host"), Col.PORT: connecting.get("port"),
            Col.STREAMS: test_start.get("num_streams"),
            Col.DURATION: test_start.get("duration")}
    if named:
        fill[Col.RUN] = named.group("run")
        fill[Col.PREFIX] = named.group("prefix")
        fill[Col.LABEL] = named.group("label")
        moment = run_time(named.group("run"))
        fill[Col.TIMESTAMP] = iso_time(moment) if moment is not None else None
    for position, value in fill.items():
        if not row[position] and value is not None:
            row[position] = str(value)
    return row


def unreadable_row(file_name, reason):
    """The ledger row of a result file that cannot be read."""
    row = [""] * len(LEDGER_COLUMNS)
    row[Col.FILE], row[Col.STATUS] = file_name, "error"
    row[Col.ERROR] = one_line("unreadable result: %s" % reason)
    return complete_row(row, {}, file_name)


def attribute_serverless(rows):
    """Give each row that names no server (iperf3 names none in the JSON of a test that could
    not connect, nor did the original script's log) the server and port of its run's other test
    (same prefix, run and label), else the only server its prefix names, else, when the prefix
    names none, the only one the folder names. Where that is ambiguous the row keeps no server
    (see link_display_name). Changes `rows` in place; returns how many it gave a server."""
    by_run, by_prefix = {}, {}
    for row in rows:
        if row[Col.SERVER]:
            address = (row[Col.SERVER], row[Col.PORT])
            by_run.setdefault((row[Col.PREFIX], row[Col.RUN], row[Col.LABEL]), set()).add(address)
            by_prefix.setdefault(row[Col.PREFIX], set()).add(address)
    everywhere = set().union(*by_prefix.values()) if by_prefix else set()
    given = 0
    for row in rows:
        if row[Col.SERVER]:
            continue
        for known in (by_run.get((row[Col.PREFIX], row[Col.RUN], row[Col.LABEL])),
                      by_prefix.get(row[Col.PREFIX]), everywhere):
            if known:
                break
        if known and len(known) == 1:
            row[Col.SERVER], port = next(iter(known))
            row[Col.PORT] = row[Col.PORT] or port
            given += 1
    return given


def csv_line(values):
    """One CSV line (with its newline) for a sequence of cells."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def run_time(run_ts):
    """A run's `<ts>` (local time) -> Unix seconds, or None when it is not one."""
    try:
        return time.mktime(time.strptime(run_ts, TIMESTAMP_FORMAT))
    except (ValueError, OverflowError):
        return None


def row_time(timestamp):
    """A ledger timestamp -> Unix seconds, or None."""
    try:
        return datetime.datetime.fromisoformat(timestamp).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def header_layout(header):
    """Where each of LEDGER_COLUMNS stands in a ledger's `header` (a list of cells; None for a
    column added after the ledger was written), and the names of the header's other columns (a
    newer version's, kept and carried along): (positions, extra). None when the header lacks
    one of BASE_COLUMNS or repeats a name (a damaged header)."""
    names = header_names(header)
    where = {name: index for index, name in enumerate(names)}
    if len(where) != len(names) or any(name not in where for name in BASE_COLUMNS):
        return None
    return ([where.get(name) for name in LEDGER_COLUMNS],
            [name for name in names if name not in LEDGER_COLUMNS])


def header_names(header):
    """A ledger header's column names: cells stripped, and the first one's UTF-8 byte order
    mark (a spreadsheet's "CSV UTF-8" writes one) dropped."""
    names = [cell.strip() for cell in header]
    if names:
        names[0] = names[0].lstrip("\ufeff").strip()
    return names


def _mapper(header):
    """(a function turning a line's cells into our row (LEDGER_COLUMNS order, then the extra
    columns), the header's extra names), or None for a damaged header. The function is None
    when rows need no change (the header is ours)."""
    layout = header_layout(header)
    if layout is None:
        return None
    positions, extra = layout
    width = len(header)
    order = [width if index is None else index for index in positions]  # width: an empty cell
    order += [index for index, name in enumerate(header_names(header)) if name in extra]
    if order == list(range(width)):
        return None, extra
    getter = operator.itemgetter(*order)
    if width not in order:
        return getter, extra
    return (lambda cells: getter(cells + [""])), extra


def well_formed(row):
    """True when a row (LEDGER_COLUMNS order) could have been written by a run or a rebuild:
    a result file's name (none for a skipped run's), a known status, numbers where numbers go,
    a readable timestamp. A line cut short by a crash while it was appended is not (it may even
    have the right number of cells, when the cut fell inside the last one)."""
    status = row[Col.STATUS]
    if status not in STATUSES or not (RESULT_NAME_RE.match(row[Col.FILE]) or (
            status == "skipped" and not row[Col.FILE] and run_time(row[Col.RUN]) is not None)):
        return False
    for position in NUMBER_POSITIONS:
        cell = row[position]
        if cell:
            try:
                float(cell)
            except ValueError:
                return False
    return not row[Col.TIMESTAMP] or row_time(row[Col.TIMESTAMP]) is not None


def _parse_lines(lines):
    """CSV cells of ledger lines (text, newline kept or not): a plain split where no cell is
    quoted (no error text held a comma or a quote: the common case, half again as fast)."""
    cells = [line.rstrip("\n").split(",") if '"' not in line and "\r" not in line else None
             for line in lines]
    if None in cells:
        cells = list(csv.reader(lines))
    return cells


LEDGER_REMEDY = "run 'iperf_client.py report --rebuild' to regenerate it from the result files"


def _ledger_mapper(path, header):
    """_mapper's (function, extra names) for a ledger's header; LedgerError when damaged."""
    mapper = (None, []) if tuple(header) == LEDGER_COLUMNS else _mapper(header)
    if mapper is None:
        raise LedgerError("ledger %s is damaged (unexpected header): %s" % (path, LEDGER_REMEDY))
    return mapper


def _check_widths(path, rows, header, first_number):
    """LedgerError naming the first of `rows` (lines from `first_number` on) whose number of
    fields is not the header's."""
    if set(map(len, rows)) - {len(header)}:
        bad = next(index for index, row in enumerate(rows) if len(row) != len(header))
        raise LedgerError("ledger %s is damaged (line %d has %d fields, not %d): %s" % (
            path, first_number + bad, len(rows[bad]), len(header), LEDGER_REMEDY))


def _ledger_from_lines(path, lines, extra=None):
    """Rows of a ledger from its lines, the header first; see read_ledger."""
    try:
        rows = _parse_lines(lines)
    except csv.Error as exc:
        raise LedgerError("ledger %s is damaged (%s): %s" % (path, exc, LEDGER_REMEDY))
    if not rows:
        return []
    header = rows.pop(0)
    mapper = _ledger_mapper(path, header)
    if rows and not lines[-1].endswith("\n"):
        # A run appending it this very moment (a reader may see half a write), or a crash cut
        # it: no row yet, even when its cells look whole (`...,3` may be `...,39` cut short).
        # The next run cuts a dead one off; --rebuild restores it from its file.
        rows.pop()
    _check_widths(path, rows, header, 2)
    getter, names = mapper
    if getter is not None:
        rows = [list(getter(row)) for row in rows]
    if extra is not None:
        extra[:] = names
    elif names:
        rows = [row[:len(LEDGER_COLUMNS)] for row in rows]
    return rows


def quick_document(head, tail):
    """The parts of a large result file the ledger needs, without parsing its intervals.

    Given the file's first and last bytes (the same bytes when the file is small), returns a
    document with "continuous_iperf", "start.timestamp.timesecs", "end" and "error", or None when
    unsure (then the caller parses the whole file). Relies on our layout: the metadata first,
    iperf3's "end" object last but for an "error" string.
    """
    while tail[:1] and 0x80 <= tail[0] < 0xC0:  # cut inside a UTF-8 character
        tail = tail[1:]
    try:
        head, tail = head.decode("utf-8"), tail.decode("utf-8")
    except UnicodeDecodeError:
        return None
    decoder = json.JSONDecoder()
    meta = _META_RE.match(head)
    ends = list(_END_RE.finditer(tail))
    if not meta or not ends:
        return None
    try:
        metadata, after_meta = decoder.raw_decode(head, meta.end())
        secs = _TIMESECS_RE.search(head, after_meta)
        if not secs:
            return None
        end, position = decoder.raw_decode(tail, ends[-1].end())
        after = _AFTER_END_RE.match(tail, position)
        if not after or not isinstance(end, dict) or not isinstance(metadata, dict):
            return None
        document = {"continuous_iperf": metadata,
                    "start": {"timestamp": {"timesecs": int(secs.group(1))}}, "end": end}
        if after.group(1):
            document["error"] = json.loads(after.group(1))
    except ValueError:
        return None
    return document


def _ledger_order(item):
    """Sort key of (start, row) in the rebuild: the order the rows were appended in. Runs never
    overlap (the lock), a run's forward test comes first; the run's <ts> (local time, with DST
    repeats) and the ledger's whole seconds only stand in when the precise start is unknown."""
    start, row = item
    if start is None:
        start = row_time(row[Col.TIMESTAMP])
    if start is None:
        start = run_time(row[Col.RUN]) or 0.0
    return (start, row[Col.DIRECTION] != "forward", row[Col.FILE])


# --- The ledger: appending to it ------------------------------------------------------------------

def append_ledger(path, row):
    """Append one row (see Col) to the ledger, with the header first when the file is new or
    empty, its cells in the order of the file's own header (a newer version's extra columns
    stay empty). A ledger of an older version first gets the columns added since (see
    upgrade_ledger). Holds the ledger's lock: a skipped run may append while a run goes on.

    The row is written whole or not at all: a short write (a full disk) is cut back off and
    raises. A last line without its newline gets one first, so the new row is never glued onto
    it; when that line is no row at all (a crash cut it short), it is cut off instead and said:
    its result file still holds it, for `report --rebuild`.
    """
    with ledger_lock(os.path.dirname(path)):
        header = ledger_header(path)
        missing = [name for name in ADDED_COLUMNS if name not in (header or LEDGER_COLUMNS)]
        if missing:
            upgrade_ledger(path, header, missing)
            header = header + missing
        _append_row(path, row, header or LEDGER_COLUMNS)


def ledger_header(path):
    """The ledger's header cells, or None when it is new, empty or its header is damaged
    (rows then go in the standard order)."""
    try:
        with open(path, "rb") as handle:
            first = handle.read(64 * 1024).split(b"\n", 1)[0].decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    cells = header_names(next(csv.reader([first]), []))
    return cells if header_layout(cells) is not None else None


def upgrade_ledger(path, header, missing):
    """Give a ledger written by an older version the `missing` columns, empty, at the end of
    every line (atomically: a crash leaves the old file). Runs once per ledger."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        text = handle.read()
    # By CSV records, not lines: a quoted cell may hold a line break.
    records = [cells for cells in csv.reader(io.StringIO(text)) if cells]
    if len(records) > 1 and not text.endswith("\n"):
        cut = text[text.rfind("\n") + 1:]
        records.pop()  # a row is whole only with its newline: a crash cut this one
        _say_cut_line(path, cut)
    pad = [""] * len(missing)
    text = csv_line(header + missing) + "".join(
        csv_line(cells + pad) for cells in records[1:])
    write_atomic(path, text.encode("utf-8", "surrogateescape"))
    log.info("the ledger %s was given the columns %s (it was written by an older version)",
             path, ", ".join(missing))


def _append_row(path, row, header):
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | O_NOFOLLOW, file_mode())
    try:
        size = os.fstat(fd).st_size
        cells = dict(zip(LEDGER_COLUMNS, row))
        text = csv_line([cells.get(column, "") for column in header])
        if size == 0:
            text = csv_line(LEDGER_COLUMNS) + text
        elif os.pread(fd, 1, size - 1) != b"\n":
            size = _end_cut_line(fd, size, path, header)
            if os.pread(fd, 1, size - 1) != b"\n":
                text = "\n" + text
        data = text.encode("utf-8")
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _end_cut_line(fd, size, path, header):
    """The ledger's size once a last line without its newline is cut off: a row is appended
    with its newline in one write, so a crash while appending left it, and its cells cannot
    tell (a number cut short is still a number). Its result file keeps it for --rebuild.
    Logs the cut."""
    tail = os.pread(fd, min(size, 64 * 1024), max(0, size - 64 * 1024))
    start = size - len(tail) + tail.rfind(b"\n") + 1
    if start == 0:
        return size  # the header itself: leave it be
    line = os.pread(fd, size - start, start).decode("utf-8", errors="replace")
    os.ftruncate(fd, start)
    _say_cut_line(path, line)
    return start


def _say_cut_line(path, line):
    log.warning("the ledger %s ended in a line cut short (%s): removed; 'report --rebuild' "
                "restores its row from its result file", path, one_line(line, 120))


@contextlib.contextmanager
def ledger_lock(folder, wait=LEDGER_LOCK_WAIT):
    """Hold the ledger's lock (a lock file of its own in `folder`) for the `with` block; waits
    up to `wait` seconds for it. Raises IperfError when it stays held."""
    path = os.path.join(folder, LEDGER_LOCK_NAME)
    fd = locked(path, wait)
    if fd is None:
        raise IperfError("the ledger's lock %s stayed held for %s s" % (path, wait))
    try:
        yield
    finally:
        os.close(fd)


# --- The ledger: reading it and rebuilding it -----------------------------------------------------

def read_ledger(path, extra=None):
    """The ledger's rows as lists of strings in LEDGER_COLUMNS order, read by its header (any
    order of our columns; a newer version's extra columns are left out, or, when `extra` is a
    list, their names put in it and their cells kept at the end of each row).

    Raises LedgerError when it is missing or damaged (salvage_ledger keeps what it can).
    """
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            lines = handle.readlines()
    except FileNotFoundError:
        raise LedgerError("no ledger %s: %s" % (path, LEDGER_REMEDY))
    except OSError as exc:
        raise IperfError("cannot read the ledger %s: %s" % (path, exc.strerror or exc))
    return _ledger_from_lines(path, lines, extra)


def read_ledger_tail(path, wanted):
    """The ledger's last rows, at least `wanted` of them where it has that many (in ledger
    order), and whether they reach back to its first row. Reads the header and the file's
    end only, so its time and memory do not grow with the ledger. Raises as read_ledger."""
    try:
        with open(path, "rb") as handle:
            header = handle.readline()
            first = handle.tell()
            position = size = os.fstat(handle.fileno()).st_size
            data, block = b"", 64 * 1024
            while position > first and data.count(b"\n") <= wanted:
                step = min(block, position - first)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
                block *= 2
    except FileNotFoundError:
        raise LedgerError("no ledger %s: %s" % (path, LEDGER_REMEDY))
    except OSError as exc:
        raise IperfError("cannot read the ledger %s: %s" % (path, exc.strerror or exc))
    if not size:
        return [], True  # a ledger cut to nothing (a full disk at its first write): no rows
    lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    if position > first:
        lines = lines[1:]  # the first one is what remains of a line cut by the seek
    lines = [line for line in lines if line.strip()]
    header = header.decode("utf-8", errors="replace")
    return _ledger_from_lines(path, [header] + lines[-wanted:]), position <= first or not size


def salvage_ledger(path, extra=None):
    """Every well-formed row of a damaged ledger, line by line, and the number of lines that
    could not be kept. A row whose result file --keep-days deleted exists nowhere else, so a
    damaged header or one bad line must not cost the others. The header says where each column
    stands when it can; else the standard order is assumed. (Cells never hold a line break:
    errors are folded onto one line.) `extra` as in read_ledger."""
    rows, dropped = [], 0
    getter, names, width = None, [], len(LEDGER_COLUMNS)
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        if not line.endswith("\n") and number:
            dropped += 1  # a row is whole only with its newline (see _end_cut_line)
            continue
        try:
            cells = next(csv.reader([line]))
        except (csv.Error, StopIteration):
            cells = []
        if number == 0:
            mapper = _mapper(cells) if tuple(cells) != LEDGER_COLUMNS else (None, [])
            if mapper is not None:
                (getter, names), width = mapper, len(cells)
                continue
            if sum(cell.strip() in BASE_COLUMNS for cell in cells) >= len(BASE_COLUMNS) // 2:
                continue  # a damaged header: the standard order is the best guess
        if getter and len(cells) == width:
            row = list(getter(cells))
        elif len(cells) == len(BASE_COLUMNS) and width == len(LEDGER_COLUMNS) and not getter:
            row = cells = cells + [""] * len(ADDED_COLUMNS)  # a 2.1 ledger's header was lost
        else:
            row = cells
        if len(cells) == width and well_formed(row):
            rows.append(row if extra is not None else row[:len(LEDGER_COLUMNS)])
        else:
            dropped += 1
    if extra is not None:
        extra[:] = names
    return rows, dropped


class LedgerReader:
    """The ledger's rows in LEDGER_COLUMNS order, read by its header, a list of rows at a time
    (REPORT_CHUNK bytes of lines): its memory does not grow with the ledger. A last line cut
    short (a run appending it this moment, or a crash) is no row yet. The reader counts the
    bytes and lines of the whole lines it has read, and their SHA-256 (what a report cache
    covers, see ReportCache), and can resume after a prefix it is shown to match.

    Raises LedgerError when the ledger is missing or damaged, IperfError when it cannot be
    read (on opening, and while reading)."""

    def __init__(self, path):
        self.path = path
        try:
            self.handle = open(path, "rb")
        except FileNotFoundError:
            raise LedgerError("no ledger %s: %s" % (path, LEDGER_REMEDY))
        except OSError as exc:
            raise IperfError("cannot read the ledger %s: %s" % (path, exc.strerror or exc))
        try:
            first = self._read(self.handle.readline)
            text = first[3:] if first.startswith(codecs.BOM_UTF8) else first
            text = text.decode("utf-8", "replace")
            try:
                self.header = _parse_lines([text])[0] if text else []
            except csv.Error as exc:
                raise LedgerError("ledger %s is damaged (%s): %s" % (path, exc, LEDGER_REMEDY))
            self.mapper = _ledger_mapper(path, self.header) if text else None
        except BaseException:
            self.handle.close()
            raise
        self.header_bytes = first
        self._restart()

    def _restart(self):
        self.digest = hashlib.sha256(self.header_bytes)
        self.offset, self.lines = len(self.header_bytes), 1 if self.header_bytes else 0
        self.handle.seek(self.offset)

    def _read(self, method, *args):
        try:
            return method(*args)
        except OSError as exc:
            raise IperfError("cannot read the ledger %s: %s" % (self.path, exc.strerror or exc))

    def close(self):
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def resume(self, offset, lines, digest):
        """True, the reader then past the ledger's first `offset` bytes (`lines` lines), when
        their SHA-256 is `digest`; else False, the reader at its first row as before."""
        left = offset - self.offset
        while left > 0:
            block = self._read(self.handle.read, min(left, REPORT_CHUNK))
            if not block:
                break
            self.digest.update(block)
            left -= len(block)
        if left == 0 and self.digest.hexdigest() == digest:
            self.offset, self.lines = offset, lines
            return True
        self._restart()
        return False

    def chunks(self):
        """The rows after the reader's place, a list at a time."""
        if self.mapper is None:
            return
        carry = b""
        while True:
            block = self._read(self.handle.read, REPORT_CHUNK)
            if not block:
                return  # what is left in `carry` is a line cut short: no row yet
            block = carry + block
            # A line ends at a LF, or at a CR but the block's last byte (maybe half a CRLF),
            # as a text file read with newline="" splits.
            end = max(block.rfind(b"\n"), block.rfind(b"\r", 0, len(block) - 1)) + 1
            if end == 0:
                carry = block
                continue
            block, carry = block[:end], block[end:]
            self.digest.update(block)
            text = block.decode("utf-8", "replace")
            del block
            if '"' in text or "\r" in text:
                # Split as a text file read with newline="" is: a lone CR ends a line too, and
                # a quoted cell may hold a line break (csv keeps it only with the line's end).
                lines = io.StringIO(text, newline="").readlines()
                del text
                try:
                    rows = _parse_lines(lines)
                except csv.Error as exc:
                    raise LedgerError("ledger %s is damaged (%s): %s" % (
                        self.path, exc, LEDGER_REMEDY))
            else:  # the common case: no cell is quoted
                lines = text.split("\n")
                del text
                lines.pop()  # the empty text after the block's last line break
                rows = [line.split(",") for line in lines]
            _check_widths(self.path, rows, self.header, self.lines + 1)
            self.offset += end
            self.lines += len(lines)
            del lines
            if self.mapper[0] is not None:
                rows = list(map(self.mapper[0], rows))
            elif self.mapper[1]:
                rows = [row[:len(LEDGER_COLUMNS)] for row in rows]
            yield rows


def latest_client(path):
    """The client named by the ledger's latest row that names one (in its last CLIENT_LOOKBACK
    rows), "" when none does. Raises as read_ledger."""
    wanted = INTERVAL_ROWS
    while True:
        rows, whole = read_ledger_tail(path, wanted)
        client = next((row[Col.CLIENT] for row in reversed(rows) if row[Col.CLIENT]), "")
        if client or whole or wanted >= CLIENT_LOOKBACK:
            return client
        wanted *= 4


def read_result_file(path, with_start=False):
    """The ledger row (a list) of one result file, plain or gzipped; never raises.

    Large files are read by their head and tail only (see quick_document), with a full parse
    as the fallback; a file that cannot be read gives an "unreadable result" error row. With
    `with_start`, returns (the test's start in Unix seconds or None, row): the rebuild's order.
    """
    name = os.path.basename(path)
    head = tail = data = None
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                data = handle.read()
            if len(data) > QUICK_HEAD + QUICK_TAIL:
                head, tail = data[:QUICK_HEAD], data[-QUICK_TAIL:]
        else:
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size > QUICK_HEAD + QUICK_TAIL:
                    head = handle.read(QUICK_HEAD)
                    handle.seek(-QUICK_TAIL, os.SEEK_END)
                    tail = handle.read()
                else:
                    data = handle.read()
        document = quick_document(head, tail) if head is not None else None
        if document is None:
            if data is None:
                with open(path, "rb") as handle:
                    data = handle.read()
            document = json.loads(data)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        row = complete_row(ledger_row(document, name), document, name)
    except Exception as exc:  # noqa: B902 -- whatever a file holds is a row, never a crash
        reason = getattr(exc, "strerror", None) or exc
        row = unreadable_row(name, reason)
        return (None, row) if with_start else row
    if not with_start:
        return row
    meta = document.get("continuous_iperf")
    start = meta.get("start") if isinstance(meta, dict) else None
    if isinstance(start, bool) or not isinstance(start, (int, float)):
        start = None
    return start, row


def _rebuild_item(path):
    return read_result_file(path, with_start=True)


def rebuild_ledger(folder, jobs=None):
    """Regenerate `folder`'s ledger from its result files, atomically; return the row count.

    Rows of the old ledger whose file is gone (deleted by --keep-days) are kept: the ledger
    outlives the raw files. Files are read in parallel when there are many.
    """
    names = sorted(name for name in os.listdir(folder) if RESULT_NAME_RE.match(name))
    # A file and its gzipped twin (gzip -k) are one test: the plain one is read.
    plain = set(names)
    names = [name for name in names if not (name.endswith(".gz") and name[:-3] in plain)]
    items = _read_result_files([os.path.join(folder, name) for name in names], jobs)
    present = set(names)
    for name in names:  # a run's file and its gzipped twin count as one
        present.add(name[:-3] if name.endswith(".gz") else name + ".gz")
    ledger = os.path.join(folder, LEDGER_NAME)
    extra = []
    old_rows = _old_ledger_rows(ledger, extra)
    # A newer version's extra columns stay, after ours, with the cells it wrote.
    extra_of = {row[Col.FILE]: row[len(LEDGER_COLUMNS):] for row in old_rows} if extra else {}
    blank = [""] * len(extra)
    items = [(start, row + extra_of.get(row[Col.FILE], blank)) for start, row in items]
    items += [(None, row) for row in old_rows if row[Col.FILE] not in present]
    items.sort(key=_ledger_order)
    rows = [row for _, row in items]
    attribute_serverless(rows)
    text = csv_line(LEDGER_COLUMNS + tuple(extra)) + "".join(csv_line(row) for row in rows)
    owner = os.stat(ledger if os.path.isfile(ledger) else folder)
    write_atomic(ledger, text.encode("utf-8"))
    if os.geteuid() == 0 and os.path.isfile(ledger):
        # root's rebuild must not leave the runs (another user) a ledger they cannot append to.
        os.chown(os.path.realpath(ledger), owner.st_uid, owner.st_gid)
    return len(rows)


def _read_result_files(paths, jobs=None):
    """(start, row) of each result file, read in worker processes when there are many."""
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(paths) < 64:
        return [_rebuild_item(path) for path in paths]
    try:
        context = multiprocessing.get_context("fork")
    except ValueError:
        context = multiprocessing.get_context()
    with context.Pool(min(jobs, 32), initializer=_quiet_worker) as pool:
        return pool.map(_rebuild_item, paths, chunksize=max(1, len(paths) // (jobs * 8)))


def _old_ledger_rows(ledger, extra):
    """The well-formed rows of the ledger being rebuilt (salvaged when it is damaged, with its
    extra columns' names put in `extra`). When a line is dropped, or the ledger is damaged, a
    copy of it is kept: what could not be salvaged may matter to a person, and exists nowhere
    else."""
    try:
        rows, dropped = read_ledger(ledger, extra), 0
    except LedgerError:
        if not os.path.exists(ledger):
            return []
        rows, dropped = salvage_ledger(ledger, extra)
        dropped = dropped or -1  # damaged: the original is kept even if every row was
    kept = [row for row in rows if well_formed(row)]
    if len(kept) < len(rows):  # rows that parse but are no rows (a line cut short)
        dropped = max(dropped, 0) + len(rows) - len(kept)
    if dropped:
        copy = keep_damaged_copy(ledger)
        say("the old ledger was damaged (%d line%s not kept); it is saved as %s"
            % (max(dropped, 0), "" if dropped == 1 else "s", copy))
    return kept


def keep_damaged_copy(ledger):
    """Copy a damaged ledger to results.csv.damaged-<ts>[-N], never over an earlier copy."""
    stamp = "%s.damaged-%s" % (ledger, time.strftime(TIMESTAMP_FORMAT))
    for attempt in range(1, 1000):
        name = stamp if attempt == 1 else "%s-%d" % (stamp, attempt)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, file_mode())
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as copy, open(ledger, "rb") as original:
            shutil.copyfileobj(original, copy)
        return name
    raise OSError(errno.EEXIST, "too many damaged copies of %s" % ledger)


def _quiet_worker():
    """A rebuild worker leaves signals to the parent: a SIGTERM or Ctrl-C to the report must
    not print a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- Statistics: selections, links, the one pass over the ledger ----------------------------------

def parse_when(text, now):
    """A --since/--until value -> Unix seconds.

    An ISO date or date-time (local time without an offset) or a span back from `now` such as
    `90m`, `24h`, `7d`, `2w`. Raises ValueError.
    """
    span = SPAN_RE.match(text)
    if span:
        return now - float(span.group(1)) * SPAN_UNITS[span.group(2)]
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        return datetime.datetime.fromisoformat(value).timestamp()  # naive: local time
    except (ValueError, OverflowError, OSError):
        raise ValueError("%r is neither an ISO date/date-time nor a span like 90m, 24h, 7d"
                         % text)


def select_rows(rows, prefix=None, since=None, until=None, direction="both"):
    """The ledger rows (lists) of one prefix, direction and period [since, until)."""
    if prefix is not None:
        rows = [row for row in rows if row[Col.PREFIX] == prefix]
    if direction != "both":
        rows = [row for row in rows if row[Col.DIRECTION] == direction]
    if since is not None or until is not None:
        low = float("-inf") if since is None else since
        high = float("inf") if until is None else until
        kept = []
        for row in rows:
            moment = row_time(row[Col.TIMESTAMP])
            if moment is not None and low <= moment < high:
                kept.append(row)
        rows = kept
    return rows


_LINK_KEY = operator.itemgetter(Col.CLIENT, Col.SERVER, Col.PORT, Col.PROTOCOL)


def group_links(rows):
    """{(client, server, port, protocol): that link's rows in ledger order}, links sorted by
    client, server, port and protocol: two targets, or TCP and UDP tests of one, are never mixed
    in one figure."""
    groups = {}
    for row in rows:
        key = _LINK_KEY(row)
        group = groups.get(key)
        if group is None:
            groups[key] = group = []
        group.append(row)
    return dict(sorted(groups.items(), key=lambda item: (
        item[0][0], item[0][1], int(item[0][2]) if item[0][2].isdigit() else 0, item[0][2],
        item[0][3])))


def link_names(links):
    """{link: its name for people}: the target's label and address, and the client's host name
    when the links come from more than one client: "client -> label (host:port)"."""
    clients = {key[0] for key in links}
    names = {}
    for key, rows in links.items():
        client, server, port, protocol = key
        label = next((row[Col.LABEL] for row in reversed(rows) if row[Col.LABEL]), "")
        name = link_display_name(server, port)
        target = Target(server, int(port) if port.isdigit() else 0, "")
        if label and label not in (default_label(target, target.port),  # not default_label's
                                   default_label(target, None)):
            name = "%s (%s)" % (label, name)
        if protocol == "udp":
            name += " UDP"
        names[key] = "%s -> %s" % (client or "?", name) if len(clients) > 1 else name
    return names


def link_display_name(server, port):
    """A link's server as people read it: HOST:PORT, or "server unknown" for tests whose files
    name no server (see attribute_serverless), never a bare ":"."""
    return target_name(server, port) if server else SERVER_UNKNOWN


def fill_clients(rows, fallback=""):
    """Give rows written before version 2.2 their folder's client (the latest row that names
    one, else `fallback`: a folder is one client's) and their protocol (tcp: UDP tests came in
    2.2, and --rebuild reads a file's real one)."""
    client = next((row[Col.CLIENT] for row in reversed(rows) if row[Col.CLIENT]), fallback)
    for row in rows:
        if not row[Col.CLIENT]:
            row[Col.CLIENT] = client
        if not row[Col.PROTOCOL]:
            row[Col.PROTOCOL] = "tcp"
    return rows


def select_link(rows, client=None, target=None, protocol=None):
    """The rows of one client (host name), one target (a Target; port None: any port) and one
    protocol (a row without one is TCP's: it was written before UDP tests came)."""
    if client is not None:
        rows = [row for row in rows if row[Col.CLIENT] == client]
    if protocol is not None:
        rows = [row for row in rows if (row[Col.PROTOCOL] or "tcp") == protocol]
    if target is not None:
        port = str(target.port) if target.port is not None else None
        rows = [row for row in rows if row[Col.SERVER] == target.host
                and (port is None or row[Col.PORT] == port)]
    return rows


def percentile(ordered, fraction):
    """Linear interpolation between closest ranks of a sorted list (numpy's default, and
    statistics.quantiles(method="inclusive")); None for an empty list."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * fraction
    low = int(position)
    if low + 1 >= len(ordered):
        return ordered[-1]
    return ordered[low] + (ordered[low + 1] - ordered[low]) * (position - low)


def _floats(cells):
    """Finite floats from CSV cells, skipping empty or unreadable ones."""
    values = []
    for cell in cells:
        try:
            value = float(cell)
        except ValueError:
            continue
        if value == value and value not in (float("inf"), float("-inf")):
            values.append(value)
    return values


def latency_grade(added_delay_ms):
    """The bufferbloat grade ("A+" to "F", LATENCY_GRADES) of an added delay under load in ms, or
    None when there is no figure (no RTT: a UDP test, a text daemon's reverse test)."""
    if added_delay_ms is None or not math.isfinite(added_delay_ms):
        return None
    for grade, below in LATENCY_GRADES:
        if added_delay_ms < below:
            return grade
    return LATENCY_GRADE_WORST


def directions_of(direction):
    return ("forward", "reverse") if direction == "both" else (direction,)


def _number_json(cell):
    """A number cell as JSON text: the number, or null when empty or not a finite number."""
    try:
        value = int(cell)
    except ValueError:
        values = _floats([cell])
        return repr(values[0]) if values else "null"
    return str(value)


def run_json(row):
    """One ledger row as a JSON object (text), its number columns as numbers."""
    if _ROW_OK_RE.match("\x1f".join(row)):  # the common case, made fast: 200,000 rows a year
        return _RUN_TEMPLATE % tuple([cell or empty for cell, empty in zip(row, _EMPTY_CELL_AS)])
    return "{" + ",".join(
        "%s:%s" % (json.dumps(name), _number_json(cell) if name in NUMBER_COLUMNS
                   else json.dumps(cell, ensure_ascii=False))
        for name, cell in zip(LEDGER_COLUMNS, row)) + "}"


def _in_minutes(seconds):
    """A span for a person, in minutes: "4.2 min" (the text report's ages, the check's)."""
    return "%.1f min" % (seconds / 60.0)


def human_bps(value):
    """Bits per second for a person: 941.2 Mbit/s, 9.41 Gbit/s."""
    if value is None:
        return "-"
    for scale, unit, digits in ((1e9, "Gbit/s", 2), (1e6, "Mbit/s", 1), (1e3, "kbit/s", 1)):
        if abs(value) >= scale:
            return "%.*f %s" % (digits, value / scale, unit)
    return "%.0f bit/s" % value


# The report reads the ledger once, row by row, and keeps per link and direction only what its
# figures need: counts and sums, and per ok test its start, hour of day and figures in compact
# array columns (4 bytes for the start, 1 for the hour, 8 a figure). Every statistic is exact:
# medians and percentiles are taken over all the tests, never a sample.
_MINUTE_SECONDS = {"%02d:%02d" % (m, s): 60 * m + s for m in range(60) for s in range(60)}
_HOUR_OF = {"%02d" % hour: hour for hour in range(24)}
_NAN = float("nan")
NO_TIME = -2 ** 31          # a test's start in a time column when its timestamp is unreadable
FAILED_KEPT = 100           # a link's latest failed tests kept for the tables
LOWEST_KEPT = 5             # a link's lowest runs shown


class Selection(collections.namedtuple("Selection", (
        "prefix", "since", "until", "directions", "client", "target", "protocol"))):
    """What the report selects: a prefix (None: all), [since, until) in Unix seconds (None: no
    bound), directions (a tuple), a client name, a Target (port None: any) and a protocol."""

    def admits(self, key):
        """True when the link (client, server, port, protocol) is selected."""
        client, server, port, protocol = key[:4]
        target = self.target
        return ((self.client is None or client == self.client)
                and (self.protocol is None or protocol == self.protocol)
                and (target is None or (server == target.host and (
                    target.port is None or port == str(target.port)))))


def _finite_sorted(values):
    """The finite numbers of a column, as a sorted list (NaN marks a test without the figure).
    A column whose sum is finite has no NaN nor infinity: sorted as it is (C loops only)."""
    if not isinstance(values, (array.array, list, tuple)):
        values = list(values)
    total = sum(values)
    if total - total == 0:
        return sorted(values)
    return sorted(filter(math.isfinite, values))


def _number_or_nan(cell):
    try:
        return float(cell or "nan")
    except ValueError:
        return _NAN


class DirectionTally:
    """One direction of one link: per ok test (ledger order) its start (seconds from the
    tally's base), its hour of day and its figures as aligned compact columns (received; a
    TCP link's mean and minimum RTT, a UDP link's jitter and loss %; NaN where a test has none),
    the sums (retransmits, packets, bytes, seconds) and each failed test's start and error
    (an index into the link's errors), for the chart's crosses."""

    __slots__ = ("link", "base", "tcp", "skipped", "retransmits", "lost_packets", "packets",
                 "bytes", "seconds", "times", "hours", "received", "first", "second",
                 "failure_times", "failure_errors", "appends")

    def __init__(self, link, base, tcp):
        self.link, self.base, self.tcp = link, base, tcp
        self.skipped = self.retransmits = 0
        self.lost_packets = self.packets = self.bytes = self.seconds = 0.0
        self.times, self.hours = array.array("i"), array.array("b")
        self.received, self.first, self.second = (array.array("d") for _ in range(3))
        self.failure_times, self.failure_errors = array.array("d"), array.array("l")
        self.appends = (self.times.append, self.hours.append, self.received.append,
                        self.first.append, self.second.append)

    @property
    def rtt(self):
        return self.first if self.tcp else array.array("d")

    def add_ok(self, row, moment):
        """Count an ok test the careful way (tally_rows does the common case itself): a UDP
        test, an unreadable start, a cell that is no number. Returns its received bits/s."""
        try:
            self.times.append(NO_TIME if moment is None else int(moment) - self.base)
        except OverflowError:
            self.times.append(NO_TIME)
        self.hours.append(_HOUR_OF.get(row[0][11:13], -1))
        received = _number_or_nan(row[11])
        self.received.append(received)
        first, second = (19, 18) if self.tcp else (20, 21)
        self.first.append(_number_or_nan(row[first]))
        self.second.append(_number_or_nan(row[second]))
        for cell, name in ((row[12], "retransmits"), (row[22], "lost_packets"),
                           (row[23], "packets")):
            value = _number_or_nan(cell)
            if value - value == 0:
                value = int(value) if name == "retransmits" else value
                setattr(self, name, getattr(self, name) + value)
        sent, duration = _number_or_nan(row[10]), _number_or_nan(row[7])
        if sent - sent == 0 and duration - duration == 0:
            self.bytes += sent * duration
            self.seconds += duration
        return received

    def moments(self):
        """The ok tests' starts in Unix seconds (NaN when unreadable), aligned with the
        figures."""
        if NO_TIME in self.times:
            return array.array("d", (_NAN if t == NO_TIME else t + self.base
                                     for t in self.times))
        return array.array("d", map(operator.add, self.times, itertools.repeat(self.base)))

    def summary(self):
        """SUMMARY_KEYS -> numbers (bits/s, ms, %; None where no ok test has the figure)."""
        values = _finite_sorted(self.received)
        low, p5, median, p95 = (values[0] if values else None, percentile(values, 0.05),
                                percentile(values, 0.5), percentile(values, 0.95))
        high, mean = (values[-1], math.fsum(values) / len(values)) if values else (None, None)
        del values  # one sorted list at a time: a year's is large
        first = percentile(_finite_sorted(self.first), 0.5)
        second = percentile(_finite_sorted(self.second), 0.5)
        rtt, base = (first, second) if self.tcp else (None, None)
        jitter, lost = (None, None) if self.tcp else (first, second)
        added = rtt - base if rtt is not None and base is not None else None
        ok, failed = len(self.times), len(self.failure_times)
        return {
            "count": ok + failed,  # tests: a skipped run ran none
            "ok": ok, "failed": failed, "skipped": self.skipped,
            "min_bps": low, "p5_bps": p5, "median_bps": median, "mean_bps": mean,
            "p95_bps": p95, "max_bps": high, "retransmits": self.retransmits,
            "median_rtt_ms": rtt, "median_min_rtt_ms": base, "added_delay_ms": added,
            "latency_grade": latency_grade(added), "median_jitter_ms": jitter,
            "median_lost_percent": lost,
            "lost_percent": 100.0 * self.lost_packets / self.packets if self.packets else None,
            "bytes": self.bytes / 8, "test_seconds": self.seconds,
        }

    def by_hour(self, name, *columns):
        """[{(name, "HH"): (median, number of tests)}, one a column] of columns by the hour of
        day of each test's start, in the local time written in the ledger (where busy-hour
        dips show). The tests' order by hour is sorted once for all the columns."""
        order, tables = None, []
        for column in columns:
            tables.append({})
            if not any(map(math.isfinite, column)):
                continue
            if order is None:
                order = sorted(range(len(column)), key=self.hours.__getitem__)  # C, stable
                counts = sorted(collections.Counter(self.hours).items())
            start = 0
            for hour, count in counts:
                chosen, start = order[start:start + count], start + count
                if hour < 0:
                    continue
                cells = operator.itemgetter(*chosen)(column) if count > 1 else [
                    column[chosen[0]]]
                values = _finite_sorted(cells)
                if values:
                    tables[-1][name, "%02d" % hour] = (percentile(values, 0.5), len(values))
        return tables

    def period(self):
        """(first, last) start of its tests in Unix seconds, or None."""
        bounds = []
        if self.times:
            low, high = min(self.times), max(self.times)
            if low == NO_TIME:
                known = [t for t in self.times if t != NO_TIME]
                low = min(known) if known else None
            if low is not None:
                bounds += [low + self.base, high + self.base]
        failures = [t for t in self.failure_times if t == t]
        if failures:
            bounds += [min(failures), max(failures)]
        return (min(bounds), max(bounds)) if bounds else None


class LinkTally:
    """One link (client, server, port, protocol) of the selected rows: its two directions, its
    latest label, latest test (the latest row written but skipped ones; one from each folder
    read), lowest runs, failed tests (the latest FAILED_KEPT, and each error's count) and its
    skipped runs' span."""

    __slots__ = ("key", "directions", "label", "latest", "last_row", "lowest", "limit",
                 "failures", "errors", "error_counts", "skipped_span", "seen")

    def __init__(self, key, base):
        self.key = key
        tcp = key[3] != "udp"
        self.directions = {"forward": DirectionTally(self, base, tcp),
                           "reverse": DirectionTally(self, base, tcp)}
        self.label, self.latest, self.last_row = "", None, None
        self.lowest, self.limit = [], [float("inf")]  # limit[0]: the highest of the lowest
        self.failures = collections.deque(maxlen=FAILED_KEPT)
        self.errors, self.error_counts = {}, collections.Counter()
        self.skipped_span, self.seen = [], 0

    def add_lowest(self, value, row):
        """A received figure below the highest of the lowest kept (ties: the earlier first)."""
        self.seen += 1
        item = (-value, -self.seen, row[0], row[3], row[14])
        if len(self.lowest) < LOWEST_KEPT:
            heapq.heappush(self.lowest, item)
        else:
            heapq.heapreplace(self.lowest, item)
        if len(self.lowest) == LOWEST_KEPT:
            self.limit[0] = -self.lowest[0][0]

    def add_other(self, side, row, moment):
        """Count a row that is no ok test: a skipped run or a failed test."""
        if row[8] == "skipped":
            self.add_skipped(side, row, moment)
        else:
            self.last_row = row
            self.add_failure(side, row, moment)

    def add_failure(self, side, row, moment):
        error = row[9]
        number = self.errors.setdefault(error, len(self.errors))
        self.error_counts[error] += 1
        side.failure_times.append(_NAN if moment is None else moment)
        side.failure_errors.append(number)
        self.failures.append((row[0], row[3], error, row[14]))

    def add_skipped(self, side, row, moment):
        side.skipped += 1
        if moment is not None:
            self.skipped_span = [min(self.skipped_span + [moment]),
                                 max(self.skipped_span + [moment])]
        if self.latest is None and self.last_row is None:
            self.latest = row  # a skipped run is the latest only when there is no test

    def end_folder(self):
        """The latest row of one folder read: the link's latest in ledger order, or, from a
        second folder (one client's name on two hosts), the later one."""
        row, self.last_row = self.last_row, None
        if row is None:
            return
        self.label = row[16] or self.label  # the latest test's label: the target's latest
        if self.latest is None or self.latest[8] == "skipped" or (
                row_time(row[0]) or 0) >= (row_time(self.latest[0]) or 0):
            self.latest = row

    def error_texts(self):
        """The link's errors, by their index in failure_errors."""
        return sorted(self.errors, key=self.errors.get)

    def usual_interval(self):
        """The usual interval between the link's runs, in seconds: the median gap between the
        starts of its latest INTERVAL_ROWS tests of one direction (a run tests each direction
        once; the direction giving the longer interval), None with fewer than three tests."""
        usual = None
        for side in self.directions.values():
            starts = sorted(set(t + side.base for t in side.times[-INTERVAL_ROWS:]
                                if t != NO_TIME).union(filter(
                                    math.isfinite, side.failure_times[-INTERVAL_ROWS:])))
            gaps = sorted(b - a for a, b in zip(starts[-INTERVAL_ROWS:],
                                                starts[-INTERVAL_ROWS + 1:]))
            if len(gaps) >= 2:
                usual = max(usual or 0.0, percentile(gaps, 0.5))
        return usual

    def period(self):
        """(first, last) start of its selected rows in Unix seconds, or None."""
        bounds = list(self.skipped_span)
        for side in self.directions.values():
            bounds += side.period() or []
        return (min(bounds), max(bounds)) if bounds else None

    def lowest_runs(self):
        """[(timestamp, direction, received, file)] of the lowest ok tests, lowest first."""
        return [(item[2], item[3], -item[0], item[4])
                for item in sorted(self.lowest, reverse=True)]


class ReportTally:
    """The whole report's state over one pass of one or several ledgers: the links and their
    directions (see sorted_links), the runs (for their count) and the selection."""

    def __init__(self, selection, emit=None):
        self.selection, self.emit = selection, emit
        self.links = {}             # (client, server, port, protocol) -> LinkTally
        self.sides = {}             # the same and a direction -> DirectionTally, or False
        self.runs = {}              # (client, prefix) -> array('q') of run stamps, 20240301120000
        self.odd_runs = set()       # runs whose stamp is not one (hand-edited, empty)
        self.hour_starts = {}       # "YYYY-MM-DDTHH" + offset -> Unix seconds of that hour
        self.clients = {}           # folder -> the clients named in its selected rows
        self.base = None            # the tests' starts are kept as seconds from this one

    def side(self, key, moment):
        """The DirectionTally of (client, server, port, protocol, direction), or False when
        it is not selected."""
        side = self.sides.get(key)
        if side is None:
            if key[4] not in self.selection.directions or not self.selection.admits(key):
                side = False
            else:
                link = self.links.get(key[:4])
                if link is None:
                    if self.base is None:
                        self.base = int(moment or 0)
                    link = self.links[key[:4]] = LinkTally(key[:4], self.base)
                side = link.directions[key[4]]
            self.sides[key] = side
        return side

    def bounds(self):
        """(since, until) as numbers, or (None, None) when the period is not bounded."""
        since, until = self.selection.since, self.selection.until
        if since is None and until is None:
            return None, None
        return (float("-inf") if since is None else since,
                float("inf") if until is None else until)

    def count_run(self, client, prefix, run):
        numbers = self.runs.get((client, prefix))
        if numbers is None:
            numbers = self.runs[client, prefix] = array.array("q")
        if len(run) != 15 or run[8] != "_" or not (run[:8] + run[9:]).isdigit():
            self.odd_runs.add((client, prefix, run))
            return
        value = int(run[:8] + run[9:])
        if not numbers or numbers[-1] != value:
            numbers.append(value)

    def run_count(self):
        """The number of distinct runs among the selected rows."""
        total = len(self.odd_runs)
        for numbers in self.runs.values():
            ordered = all(a < b for a, b in zip(numbers, numbers[1:]))
            total += len(numbers) if ordered else len(set(numbers))
        return total

    def end_folder(self):
        for link in self.links.values():
            link.end_folder()

    def sorted_links(self):
        """{key: LinkTally} of the selected links, sorted by client, server, port, protocol."""
        return dict(sorted(self.links.items(), key=lambda item: (
            item[0][0], item[0][1], int(item[0][2]) if item[0][2].isdigit() else 0,
            item[0][2], item[0][3])))

    def period(self):
        """(first, last) test start in Unix seconds over the selected links, or None."""
        bounds = [moment for link in self.links.values() for moment in link.period() or ()]
        return (min(bounds), max(bounds)) if bounds else None


def _slow_moment(stamp, hour_starts):
    """A timestamp -> Unix seconds (row_time; whole seconds), remembering the start of its
    hour (by the text of its date, hour and UTC offset) so that the pass reads the next ones
    of that hour from a dict."""
    moment = row_time(stamp)
    if moment is None:
        return None
    moment = int(moment // 1)
    if len(stamp) == 25 and stamp[14:19] in _MINUTE_SECONDS:
        hour_starts[stamp[:13] + stamp[19:]] = moment - _MINUTE_SECONDS[stamp[14:19]]
    return moment


def tally_rows(tally, rows, fallback, folder):
    """Count a folder's selected rows into `tally`, an ok TCP test inline (for every row)."""
    sides, starts, minutes, hour_of, emit = tally.sides, tally.hour_starts, _MINUTE_SECONDS, \
        _HOUR_OF, tally.emit
    low, high, prefix = tally.bounds() + (tally.selection.prefix,)
    clients, last_run, last_client, last_prefix = tally.clients.setdefault(folder, set()), 0, 0, 0
    for row in rows:
        stamp = row[0]
        try:
            moment = starts[stamp[:13] + stamp[19:]] + minutes[stamp[14:19]]
        except KeyError:
            moment = _slow_moment(stamp, starts)
        if (low is not None and (moment is None or not low <= moment < high)) or (
                prefix is not None and row[2] != prefix):
            continue
        key = (row[15] or fallback, row[4], row[5], row[17] or "tcp", row[3])
        side = sides.get(key) or tally.side(key, moment)  # False: a link not selected
        if not side:
            continue
        link = side.link
        if row[1] != last_run or key[0] != last_client or row[2] != last_prefix:
            last_run, last_client, last_prefix = row[1], key[0], row[2]  # a run's first row
            tally.count_run(key[0], row[2], row[1])
            clients.add(key[0])
        if row[8] == "ok":
            link.last_row = row
            try:
                received, rtt, least, sent, duration, retransmits = (
                    float(row[11] or "nan"), float(row[19] or "nan"), float(row[18] or "nan"),
                    float(row[10]), float(row[7]), int(row[12] or 0))
                times, hours, values, first, second = side.appends
                times(moment - side.base if side.tcp else None)
            except (ValueError, TypeError, OverflowError):  # UDP, no time, not a number
                received = side.add_ok(row, moment)
            else:
                hours(hour_of.get(stamp[11:13], -1))
                values(received)
                first(rtt)
                second(least)
                side.bytes, side.seconds = side.bytes + sent * duration, side.seconds + duration
                side.retransmits += retransmits
            if received < link.limit[0]:
                link.add_lowest(received, row)
        else:
            link.add_other(side, row, moment)
        if emit is not None:
            emit(row, key)


# --- Several folders, and the report cache --------------------------------------------------------

def absorb_tally(tally, other):
    """Add `other`, one folder's ReportTally (after its end_folder), to `tally`, as if its rows
    had been read after those already counted (a folder is one client's: see tally_folders)."""
    if tally.base is None:
        tally.base = other.base
    for key, numbers in other.runs.items():
        mine = tally.runs.setdefault(key, array.array("q"))
        mine.extend(numbers[1:] if mine and numbers and mine[-1] == numbers[0] else numbers)
    tally.odd_runs |= other.odd_runs
    tally.clients.update(other.clients)
    for key, link in other.links.items():
        if key in tally.links:
            absorb_link(tally.links[key], link)
        else:
            tally.links[key] = link


def absorb_link(link, other):
    """Add a later folder's LinkTally of the same link to `link` (see LinkTally.end_folder)."""
    row = other.latest
    if row is not None and row[Col.STATUS] != "skipped":  # the folder tested the link
        link.label = other.label or link.label
        if link.latest is None or link.latest[Col.STATUS] == "skipped" or (
                row_time(row[0]) or 0) >= (row_time(link.latest[0]) or 0):
            link.latest = row
    elif link.latest is None:
        link.latest = row
    # The lowest runs: ties go to the earlier test, and every test of `other` is later.
    later = [(value, order - link.seen) + tuple(rest) for value, order, *rest in other.lowest]
    link.lowest = heapq.nlargest(LOWEST_KEPT, link.lowest + later)
    heapq.heapify(link.lowest)
    link.limit[0] = -link.lowest[0][0] if len(link.lowest) == LOWEST_KEPT else float("inf")
    link.seen += other.seen
    link.failures.extend(other.failures)
    numbers = array.array("l", (link.errors.setdefault(error, len(link.errors))
                                for error in other.error_texts()))
    link.error_counts.update(other.error_counts)
    link.skipped_span = [min(link.skipped_span[:1] + other.skipped_span[:1]),
                         max(link.skipped_span[1:] + other.skipped_span[1:])] \
        if link.skipped_span or other.skipped_span else []
    for name, side in other.directions.items():
        absorb_side(link.directions[name], side, numbers)


def absorb_side(side, other, numbers):
    """Add a later folder's DirectionTally to `side`; `numbers`: its error indexes' new ones."""
    side.skipped += other.skipped
    side.retransmits += other.retransmits
    side.lost_packets += other.lost_packets
    side.packets += other.packets
    side.bytes += other.bytes
    side.seconds += other.seconds
    shift, times = other.base - side.base, other.times
    if shift and times:
        low, high = min(times), max(times)
        if low != NO_TIME and -2 ** 31 < low + shift and high + shift < 2 ** 31:
            times = array.array("i", map(shift.__add__, times))
        else:  # a start that is no time, or out of the column's reach from this base
            times = array.array("i", (t + shift if t != NO_TIME and -2 ** 31 < t + shift
                                      < 2 ** 31 else NO_TIME for t in times))
    side.times.extend(times)
    side.hours.extend(other.hours)
    side.received.extend(other.received)
    side.first.extend(other.first)
    side.second.extend(other.second)
    side.failure_times.extend(other.failure_times)
    side.failure_errors.extend(array.array("l", map(numbers.__getitem__, other.failure_errors)))


class ReportCache:
    """What a folder's pass counted (its ReportTally before end_folder) for one selection, kept
    beside the ledger (REPORT_CACHE_DIR) so that the next report reads only the lines added
    since. The ledger stays the only truth: the cache names the bytes of the ledger it covers
    (their length, line count and SHA-256) and is believed only when the ledger's first bytes
    still hash to that; its own content is checked by a SHA-256 too. Anything else (an edit, a
    rebuild, a rotated ledger, another version, a torn file) and it is ignored and rewritten.

    File: the SHA-256 of the rest; one line of JSON (the counts, rows and names); the tally's
    arrays' bytes."""

    VERSION = 1
    _ARRAYS = ("times", "hours", "received", "first", "second", "failure_times",
               "failure_errors")
    _SUMS = ("skipped", "retransmits", "lost_packets", "packets", "bytes", "seconds")

    def __init__(self, results, selection, fallback):
        self.results, self.folder = results, os.path.join(results, REPORT_CACHE_DIR)
        chosen = list(selection)
        chosen[5] = None if selection.target is None else list(selection.target[:2])
        # A timestamp without a UTC offset (a hand's edit) is read in local time: the cache of
        # one time zone is not another's.
        zone = [os.environ.get("TZ"), time.tzname, time.timezone, time.altzone]
        key = json.dumps([self.VERSION, chosen, fallback, zone, sys.byteorder,
                          array.array("l").itemsize])
        self.path = os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest()[:20])
        self.selection, self.key = selection, key

    def load(self, reader):
        """The ReportTally the cache holds, `reader` resumed after the lines it covers; None
        (the reader untouched) when there is no cache or it does not match."""
        try:
            with open(self.path, "rb") as handle:
                content = handle.readline().strip().decode("ascii")
                line = handle.readline()
                head = json.loads(line.decode("utf-8"))
                if head["key"] != self.key or not self._sizes_fit(head, handle):
                    return None
                digest = hashlib.sha256(line)
                tally = self._tally(head, handle, digest)
            if digest.hexdigest() != content:
                return None
            offset, lines, ledger_digest = head["ledger"]
            if not (isinstance(offset, int) and isinstance(lines, int)):
                return None
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, OverflowError,
                MemoryError):
            return None
        if not reader.resume(offset, lines, ledger_digest):
            return None
        with contextlib.suppress(OSError):
            os.utime(self.path)  # the caches kept are the latest used (see _prune)
        return tally

    def _sizes_fit(self, head, handle):
        """True when the arrays the head names fill the rest of the file exactly: a damaged
        head must not make the report read (or allocate) what is not there."""
        sizes, blank = [("q", length) for _, length in head["runs"]], DirectionTally(None, 0, True)
        typecodes = [getattr(blank, attribute).typecode for attribute in self._ARRAYS]
        for item in head["links"]:
            for _, _, lengths in item["sides"]:
                if len(lengths) != len(self._ARRAYS):
                    return False
                sizes += zip(typecodes, lengths)
        if not all(type(length) is int and length >= 0 for _, length in sizes):
            return False
        left = os.fstat(handle.fileno()).st_size - handle.tell()
        return sum(array.array(code).itemsize * length for code, length in sizes) == left

    def _tally(self, head, handle, digest):
        tally = ReportTally(self.selection)
        tally.base = head["base"]

        def column(typecode, length):  # a short read fails the content's digest
            data = handle.read(length * array.array(typecode).itemsize)
            digest.update(data)
            values = array.array(typecode)
            values.frombytes(data)
            return values
        for key, length in head["runs"]:
            tally.runs[tuple(key)] = column("q", length)
        tally.odd_runs = {tuple(run) for run in head["odd_runs"]}
        tally.clients = {self.results: set(head["clients"])}
        for item in head["links"]:
            link = tally.links[tuple(item["key"])] = LinkTally(tuple(item["key"]), tally.base)
            link.label, link.latest, link.last_row = item["label"], item["latest"], item["last"]
            link.lowest = [tuple(entry) for entry in item["lowest"]]
            link.limit[0], link.seen = item["limit"], item["seen"]
            link.failures.extend(tuple(failure) for failure in item["failures"])
            link.errors = {error: number for number, error in enumerate(item["errors"])}
            link.error_counts.update(dict(zip(item["errors"], item["error_counts"])))
            link.skipped_span = item["skipped_span"]
            for name, sums, lengths in item["sides"]:
                side = link.directions[name]
                for attribute, value in zip(self._SUMS, sums):
                    setattr(side, attribute, value)
                for attribute, length in zip(self._ARRAYS, lengths):
                    getattr(side, attribute).extend(column(
                        getattr(side, attribute).typecode, length))
        return tally

    def save(self, tally, reader):
        """Keep `tally` (one folder's, before its end_folder) as what the ledger's lines read
        by `reader` hold. Quietly nothing when the folder cannot be written: the cache only
        saves time."""
        arrays, runs = [], []
        for key, numbers in tally.runs.items():
            runs.append([list(key), len(numbers)])
            arrays.append(numbers)
        links = []
        for key, link in tally.links.items():
            sides = []
            for name, side in link.directions.items():
                columns = [getattr(side, attribute) for attribute in self._ARRAYS]
                sides.append([name, [getattr(side, attribute) for attribute in self._SUMS],
                              list(map(len, columns))])
                arrays += columns
            links.append({
                "key": list(key), "label": link.label, "latest": link.latest,
                "last": link.last_row, "lowest": link.lowest, "limit": link.limit[0],
                "seen": link.seen, "failures": list(link.failures),
                "errors": link.error_texts(),
                "error_counts": [link.error_counts[error] for error in link.error_texts()],
                "skipped_span": link.skipped_span, "sides": sides})
        head = {"key": self.key, "base": tally.base,
                "ledger": [reader.offset, reader.lines, reader.digest.hexdigest()],
                "runs": runs, "odd_runs": sorted(tally.odd_runs),
                "clients": sorted(set().union(*tally.clients.values())), "links": links}
        line = json.dumps(head).encode("utf-8") + b"\n"
        digest = hashlib.sha256(line)
        for values in arrays:
            digest.update(values)
        try:
            self._write(digest.hexdigest().encode("ascii") + b"\n" + line, arrays)
        except OSError:
            pass

    def _write(self, head, arrays):
        """Only the results folder's owner writes its cache. Another user's report (root's
        included) reads a valid cache but writes none: it would write where the owner can
        swap a name for a symbolic link (to /etc), or leave files the owner cannot replace."""
        uid = os.geteuid()
        if os.stat(self.results).st_uid != uid:
            return
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.folder, 0o755)
        place = os.lstat(self.folder)
        if not stat.S_ISDIR(place.st_mode) or place.st_uid != uid:
            return  # a symbolic link, or not the owner's: not written through
        fd, temp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(head)
                for values in arrays:
                    values.tofile(handle)
                os.fchmod(handle.fileno(), file_mode())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._prune()

    def _prune(self):
        """One cache per selection: the REPORT_CACHES_KEPT latest used are kept; temporary
        files a killed report left behind go after an hour. Nothing else is touched."""
        names = os.listdir(self.folder)
        caches = [os.path.join(self.folder, name) for name in names
                  if _CACHE_NAME_RE.match(name)]
        for stale in sorted(caches, key=_mtime_or_zero)[:-REPORT_CACHES_KEPT]:
            with contextlib.suppress(OSError):
                os.unlink(stale)
        for name in names:
            path = os.path.join(self.folder, name)
            if name.startswith(".") and name.endswith(".tmp") and (
                    _mtime_or_zero(path) < time.time() - 3600):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _mtime_or_zero(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def tally_folder(folder, selection, fallback, emit, cached):
    """One folder's ReportTally (before its end_folder): from its report cache and the
    ledger's lines added since, when `cached` and the ledger is large enough for it to pay,
    else from the whole ledger. Raises IperfError."""
    ledger = os.path.join(folder, LEDGER_NAME)
    with LedgerReader(ledger) as reader:
        cache = tally = None
        if cached and emit is None:
            cache = ReportCache(folder, selection, fallback)
            tally = cache.load(reader)
        covered = reader.offset
        if tally is None:
            tally = ReportTally(selection, emit)
        for rows in reader.chunks():
            tally_rows(tally, rows, fallback, folder)
        if cache is not None and reader.offset != covered and (
                reader.offset >= REPORT_CACHE_MIN_BYTES or os.path.exists(cache.path)):
            cache.save(tally, reader)
    return tally


# --- The reports: overview, text and JSON ---------------------------------------------------------

def names_of(links):
    """{key: name} of the links of a tally (see link_names)."""
    def label_row(label):
        row = [""] * len(LEDGER_COLUMNS)
        row[Col.LABEL] = label
        return row
    return link_names({key: [label_row(link.label)] for key, link in links.items()})


def link_overview(links, names, direction, now):
    """One dict per link (the JSON's `links`): its name, client, server, port, protocol, label,
    failed % (of its tests), its latest test (the latest written; a skipped run only when it
    has no test: timestamp, status, age in seconds), the median received per direction and
    the summary per direction (DirectionTally.summary)."""
    overview = []
    for key, link in links.items():
        summary = {name: link.directions[name].summary() for name in directions_of(direction)}
        tests = sum(stats["count"] for stats in summary.values())
        failed = sum(stats["failed"] for stats in summary.values())
        latest = link.latest or [""] * len(LEDGER_COLUMNS)
        stamp, status, moment = latest[Col.TIMESTAMP], latest[Col.STATUS] or "skipped", \
            row_time(latest[Col.TIMESTAMP])
        overview.append({
            "name": names[key], "client": key[0], "server": key[1],
            "port": int(key[2]) if key[2].isdigit() else None, "protocol": key[3],
            "label": link.label, "failed_percent": 100.0 * failed / tests if tests else 0.0,
            "latest": stamp, "latest_status": status,
            "age_s": now - moment if moment is not None and now is not None else None,
            "median_bps": {name: stats["median_bps"] for name, stats in summary.items()},
            "summary": summary, "by_hour": _hours_json(*hour_tables(link, list(summary)))})
    return overview


def _hours_json(received, rtt):
    """{direction: {"HH": {"median_bps", "tests", "median_rtt_ms", "rtt_tests"}}}, the hours
    with a test, from hour_tables()."""
    hours = {}
    for (name, hour), (median, count) in sorted(received.items()):
        rtt_median, rtt_count = rtt.get((name, hour), (None, 0))
        hours.setdefault(name, {})[hour] = {"median_bps": median, "tests": count,
                                            "median_rtt_ms": rtt_median, "rtt_tests": rtt_count}
    return hours


def hour_medians(item, key="median_bps", count="tests"):
    """{(direction, "HH"): (median, tests)} of a link_overview item's by_hour."""
    return {(name, hour): (figures[key], figures[count])
            for name, hours in item["by_hour"].items() for hour, figures in hours.items()
            if figures[count]}


def text_report(tally, links, overview, folder, prefix, since, until, now):
    """The report for a person, as a list of lines: the heading, one overview line per link,
    then each link's section (one link or many alike)."""
    lines = _report_heading(tally, folder, prefix, since, until, now)
    if not links:
        return lines
    lines += ["", "links (median received, failed tests, latest test):"]
    width = max(len(item["name"]) for item in overview)
    for item in overview:
        lines.append("  %-*s %s  %5.1f%% failed  latest %s%s (%s)" % (
            width, item["name"], "  ".join("%s %11s" % (name, human_bps(value))
                                           for name, value in item["median_bps"].items()),
            item["failed_percent"], item["latest"] or "-",
            " %s" % _LATEST_MARK.get(item["latest_status"], "FAILED")
            if item["latest_status"] != "ok" else "", _age_text(item["age_s"])))
    for link, item in zip(links.values(), overview):
        lines += ["", "== %s ==" % item["name"], ""]
        lines += _link_text(link, item)
    return lines


_LATEST_MARK = {"error": "FAILED", "skipped": "SKIPPED"}


def _age_text(seconds):
    if seconds is None:
        return "age unknown"
    if seconds < -FUTURE_SLACK:
        return "%s in the future" % _in_minutes(-seconds)
    return "%s ago" % (_in_minutes(max(0.0, seconds)) if seconds < 5400
                       else "%.1f h" % (seconds / 3600.0) if seconds < 2 * 86400
                       else "%.1f days" % (seconds / 86400.0))


def _report_heading(tally, folder, prefix, since, until, now):
    lines = ["continuous-iperf report: %s, %s" % (
        folder, "prefix %r" % prefix if prefix is not None else "all prefixes")]
    moments = tally.period()
    if not tally.links:
        lines.append("no results%s." % (" in the selected period" if since or until else ""))
        return lines
    if moments:
        runs = tally.run_count()
        lines.append("period: %s to %s, %d run%s" % (
            iso_time(moments[0]), iso_time(moments[1]), runs, "" if runs == 1 else "s"))
        if now is not None and moments[1] > now + FUTURE_SLACK:
            lines.append("warning: tests are dated up to %s, in the future: a clock was off "
                         "when they ran" % iso_time(moments[1]))
    return lines


def hour_tables(link, names):
    """({(direction, "HH"): (median received, tests)}, the same of the RTT under load)."""
    received, rtt = {}, {}
    for name in names:
        side = link.directions[name]
        by_received, by_rtt = side.by_hour(name, side.received, side.rtt)
        received.update(by_received)
        rtt.update(by_rtt)
    return received, rtt


def _link_text(link, item):
    lines, summary = [], item["summary"]
    for name, stats in summary.items():
        lines += _summary_lines(name, stats)
    lines += traffic_lines(summary, link)
    lines += _hour_lines(hour_medians(item), list(summary))
    lines += _hour_lines(hour_medians(item, "median_rtt_ms", "rtt_tests"), list(summary),
                         "median RTT under load", _ms)
    lowest = link.lowest_runs()
    if lowest:
        lines += ["", "lowest runs (received):"]
        lines += ["  %s %-7s %12s  %s" % (stamp, direction, human_bps(value), name)
                  for stamp, direction, value, name in lowest]
    return lines + _failure_lines(link, sum(stats["failed"] for stats in summary.values()))


def _tests(count):
    return "%d test%s" % (count, "" if count == 1 else "s")


def _summary_lines(name, stats):
    count = stats["count"]
    lines = ["%s: %s, %d ok, %d failed (%.1f%%)%s" % (
        name, _tests(count), stats["ok"], stats["failed"],
        100.0 * stats["failed"] / count if count else 0.0,
        ", and %d run%s skipped (another run held the folder)" % (
            stats["skipped"], "" if stats["skipped"] == 1 else "s") if stats["skipped"] else "")]
    if stats["median_bps"] is not None:
        figures = {key: human_bps(stats[key]) for key in SUMMARY_KEYS if key.endswith("_bps")}
        lines.append("  received: median %(median_bps)s, mean %(mean_bps)s" % figures)
        lines.append("            p5 %(p5_bps)s, p95 %(p95_bps)s, min %(min_bps)s, "
                     "max %(max_bps)s" % figures)
        if stats["lost_percent"] is None:  # TCP's: a UDP test retransmits nothing
            lines.append("  retransmits: %d (ok tests)" % stats["retransmits"])
    if stats["median_rtt_ms"] is not None:
        lines.append("  latency under load: median RTT %s, base (median of the minimum RTT) %s, "
                     "added by the load %s, grade (approx.) %s" % (
                         _ms(stats["median_rtt_ms"]), _ms(stats["median_min_rtt_ms"]),
                         _ms(stats["added_delay_ms"]), stats["latency_grade"] or "-"))
    if stats["median_jitter_ms"] is not None or stats["lost_percent"] is not None:
        lines.append("  UDP: median jitter %s, loss: median test %s, all packets %s" % (
            _ms(stats["median_jitter_ms"]), _percent(stats["median_lost_percent"]),
            _percent(stats["lost_percent"])))
    return lines


def _ms(value):
    return "-" if value is None else "%.*f ms" % (2 if abs(value) < 10 else 1, value)


def _percent(value):
    return "-" if value is None else "%.*f%%" % (3 if 0 < abs(value) < 0.1 else 2, value)


def human_bytes(value):
    """Bytes for a person: 4.3 TB, 15.0 GB, 512 MB (powers of 1000, as link rates are)."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(value) >= scale:
            return "%.1f %s" % (value / scale, unit)
    return "%.0f B" % value


def traffic_lines(summary, link):
    """What the tests cost: bytes sent each way per day, and the share of the time the link was
    under test, over its period (first test to last, plus one usual interval)."""
    usual, moments = link.usual_interval(), link.period()
    if not moments or not usual:
        return []  # fewer than three runs: no period to spread the traffic over
    span = moments[1] - moments[0] + usual
    days = span / 86400.0
    seconds = sum(stats["test_seconds"] for stats in summary.values())
    parts = ["%s %s/day" % (DIRECTION_LABEL[name], human_bytes(stats["bytes"] / days))
             for name, stats in summary.items()]
    return ["", "test traffic: %s; the link was under test %.1f%% of the time" % (
        ", ".join(parts), min(100.0, 100.0 * seconds / span))]


def _hour_lines(by_hour, names, what="median received", shown=None):
    """The table of medians by hour of day (see DirectionTally.by_hour), one column a
    direction; nothing when no hour has a test."""
    if not by_hour:
        return []
    shown = shown or human_bps
    lines = ["", "%s by hour of day (local time of the test):" % what,
             "  hour" + "".join("%24s" % name for name in names)]
    for hour in ("%02d" % h for h in range(24)):
        cells = []
        for name in names:
            median, count = by_hour.get((name, hour), (None, 0))
            cells.append("%24s" % ("%s (%d)" % (shown(median), count) if count else "-"))
        lines.append("  %s  %s" % (hour, "".join(cells)))
    return lines


def _failure_lines(link, total):
    """The last failed tests and, when there are many, their most frequent errors."""
    if not total:
        return []
    failed = list(link.failures)[-10:]
    lines = ["", "failed runs (%s):" % (
        "all %d" % total if total <= 10 else "the last 10 of %d" % total)]
    lines += ["  %s %-7s %s" % (stamp, direction, error)
              for stamp, direction, error, _ in failed]
    if total > 10:
        lines += ["", "errors, most frequent first:"]
        lines += ["  %6d  %s" % (n, error) for error, n in link.error_counts.most_common(5)]
    return lines


# --- Pure helpers: the HTML report (drawing only: the figures come from the report's helpers) -----

Box = collections.namedtuple("Box", "left right top bottom")  # a chart's plot area, pixels


def chart_unit(top):
    """(divisor, unit) of an axis that reaches `top` bits/s: Gbit/s from 1 Gbit/s, else Mbit/s."""
    return (1e9, "Gbit/s") if top >= 1e9 else (1e6, "Mbit/s")


def nice_ticks(top, count=5):
    """Round tick values from 0 to at least `top`, in steps of 1, 2, 2.5 or 5 x 10^n."""
    top = top if top and top > 0 else 1.0
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def _tick_label(value):
    return ("%.2f" % value).rstrip("0").rstrip(".")


def time_ticks(start, end, most=8):
    """Ticks at round local times within [start, end] (Unix seconds): (ticks, step seconds).

    Steps under a day fall on multiples of the step since local midnight, longer ones on
    midnights; ticks are computed in local time, so they stay round across DST changes.
    """
    span = max(end - start, 60.0)
    step = next((s for s in TIME_STEPS if span / s <= most), None)
    if step is None:
        step = TIME_STEPS[-1] * int(math.ceil(span / most / TIME_STEPS[-1]))
    midnight = datetime.datetime.fromtimestamp(start).replace(hour=0, minute=0, second=0,
                                                              microsecond=0)
    if step < 86400:
        moment = midnight + datetime.timedelta(
            seconds=step * int((start - midnight.timestamp()) // step))
        delta = datetime.timedelta(seconds=step)
    else:
        moment, delta = midnight, datetime.timedelta(days=step // 86400)
    ticks = []
    while moment.timestamp() <= end:
        if moment.timestamp() >= start:
            ticks.append(moment.timestamp())
        moment += delta
    return ticks, step


def chart_points(times, values, failure_times, span, limit=MAX_POINTS):
    """A direction's chart points in time order: [(unix seconds, value or None for a failed
    test, band)] from its ok tests' aligned `times` and `values` (NaN: no figure) and its
    failed tests' times. Up to `limit` tests, each test (band None); more, and each point is
    the median of one of `limit` / 2 equal time slots of the span, with its (p5, p95) band
    (None where a slot held failed tests only), so a long period shows what the link really
    did without a point per test."""
    keep = list(map(math.isfinite, map(operator.add, times, values)))  # time and figure
    failures = list(filter(math.isfinite, failure_times))
    if sum(keep) + len(failures) <= limit:
        points = [(moment, value, None) for moment, value in zip(
            itertools.compress(times, keep), itertools.compress(values, keep))]
        points += [(moment, None, None) for moment in failures]
        return sorted(points, key=operator.itemgetter(0))
    start, end = span
    width = (end - start) / (limit // 2) or 1.0

    def slot_of(moments):
        return map(int, map(operator.floordiv, map(operator.sub, moments, itertools.repeat(
            start)), itertools.repeat(width)))
    if not all(keep):  # no copy of a year's columns in the usual case
        times = array.array("d", itertools.compress(times, keep))
        values = array.array("d", itertools.compress(values, keep))
    if all(map(operator.le, times, itertools.islice(times, 1, None))):  # in time order
        slots = _ordered_slots(times, values, lambda moment: next(slot_of((moment,))))
    else:
        slots = {}
        for number, group in itertools.groupby(zip(slot_of(times), values),
                                               key=operator.itemgetter(0)):
            slots.setdefault(number, array.array("d")).extend(
                map(operator.itemgetter(1), group))
    for number in slot_of(failures):
        slots.setdefault(number, array.array("d"))
    points = []
    for number in sorted(slots):
        ordered = sorted(slots[number])
        points.append((start + (number + 0.5) * width, percentile(ordered, 0.5),
                       (percentile(ordered, 0.05), percentile(ordered, 0.95)) if ordered
                       else None))
    return points


def _ordered_slots(times, values, slot):
    """{slot number: its values (an array slice)} of tests in time order, each slot's end
    found by a binary search of `slot` (monotonic in time): a few steps a slot, not one a
    test."""
    slots, low, count = {}, 0, len(times)
    while low < count:
        number, high, end = slot(times[low]), low + 1, count
        while high < end:
            middle = (high + end) // 2
            if slot(times[middle]) > number:
                end = middle
            else:
                high = middle + 1
        slots[number], low = values[low:high], high
    return slots


def split_at_gaps(points, factor=GAP_FACTOR):
    """Runs of consecutive ok tests to draw as one line each: a failed test (None) or a pause
    longer than `factor` times the usual (median) interval between tests ends a run."""
    gaps = sorted(b[0] - a[0] for a, b in zip(points, points[1:]) if b[0] > a[0])
    usual = percentile(gaps, 0.5) or 0.0
    segments, current, previous = [], [], None
    for point in points:
        if current and (point[1] is None or point[0] - previous > factor * usual):
            segments.append(current)
            current = []
        if point[1] is not None:
            current.append(point)
        previous = point[0]
    if current:
        segments.append(current)
    return segments


def _svg_open(width, height, label, css):
    return ['<svg viewBox="0 0 %d %d" class="%s" role="img" aria-label="%s">'
            % (width, height, css, html.escape(label)), "<title>%s</title>" % html.escape(label)]


def svg_time_chart(series, failures, medians, start, end, width=SVG_WIDTH, height=330,
                   what="received throughput", unit="bit/s"):
    """An SVG line chart of received bits/s (or, with unit "ms", an RTT) over time.

    `series` maps a direction to its chart_points(), `failures` a direction to its failed
    tests [(unix seconds, error text)], `medians` a direction to its median (drawn as a
    reference line). A slot's p5-p95 band is shaded behind its line; failed tests are crosses
    in a band under the time axis.
    """
    box = Box(56, width - 104, 34, height - 74)
    values = [p[2][1] if p[2] else p[1] for points in series.values() for p in points
              if p[1] is not None]
    scale = YScale(values + [m for m in medians.values() if m is not None], box, unit)
    span = (end - start) or 1.0

    def x_of(moment):
        return box.left + (moment - start) * (box.right - box.left) / span

    out = _svg_open(width, height, "%s over time, %s" % (what, scale.unit),
                    "chart time-chart" + (" rtt-chart" if unit == "ms" else ""))
    out += _y_grid(scale, box) + _time_axis(start, end, x_of, box)
    out.append('<line class="axis" x1="%d" x2="%d" y1="%d" y2="%d"/>'
               % (box.left, box.left, box.top, box.bottom))
    label_y = {name: scale.y_of(medians[name]) for name in series
               if medians.get(name) is not None}
    if len(label_y) == 2 and abs(label_y["forward"] - label_y["reverse"]) < 28:
        middle = (label_y["forward"] + label_y["reverse"]) / 2  # keep both labels legible
        upper = min(label_y, key=label_y.get)
        label_y = {name: middle + (-14 if name == upper else 14) for name in label_y}
    for index, (name, points) in enumerate(series.items()):
        out += _series_marks(name, points, x_of, scale.y_of)
        if name in label_y:
            out += _median_marks(name, medians[name], label_y[name], scale.y_of, box,
                                 scale.shown)
        out += _failure_marks(name, failures.get(name, ()), x_of, box.left,
                              box.bottom + 12 + 12 * index)

    def line_swatch(name, x, colour, dash, fill):
        return ('<line class="legend %s" x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s" '
                'stroke-width="2.5"%s/>' % (name, x, x + 28, box.top - 20, box.top - 20, colour,
                                            ' stroke-dasharray="%s"' % dash if dash else ""))
    out += _legend(list(series), box, line_swatch, 34)
    banded = any(p[2] for points in series.values() for p in points)
    out.append('<text class="small" x="%d" y="%d" dy="4">&#215; failed test, dotted: median%s'
               '</text>' % (box.left + 20 + 225 * len(series), box.top - 20,
                            ", shaded: p5-p95 of a slot" if banded else ""))
    out.append("</svg>")
    return "\n".join(out)


class YScale:
    """The bits/s (or ms) axis of a chart that must reach the largest of `values`: its unit,
    its round ticks (in that unit), y_of(value) -> pixels within `box`, shown(value) -> text."""

    def __init__(self, values, box, unit="bit/s"):
        if unit == "ms":
            self.divisor, self.unit, self.shown = 1.0, "ms", _ms
        else:
            self.divisor, self.unit = chart_unit(max(values) if values else 0)
            self.shown = human_bps
        self.ticks = nice_ticks(max(values) / self.divisor if values else 1)
        self.box = box

    def y_of(self, value):
        return self.box.bottom - value / self.divisor * (
            self.box.bottom - self.box.top) / self.ticks[-1]


def _y_grid(scale, box):
    """Horizontal grid lines with their labels, the unit over them, and the time or hour axis'
    own line at the bottom."""
    out = []
    for tick in scale.ticks:
        y = scale.y_of(tick * scale.divisor)
        out.append('<line class="grid" x1="%d" x2="%d" y1="%.1f" y2="%.1f"/>'
                   % (box.left, box.right, y, y))
        out.append('<text x="%d" y="%.1f" text-anchor="end" dy="4">%s</text>'
                   % (box.left - 6, y, _tick_label(tick)))
    out.append('<text x="%d" y="%d" text-anchor="start">%s</text>' % (4, box.top - 16,
                                                                      scale.unit))
    out.append('<line class="axis" x1="%d" x2="%d" y1="%d" y2="%d"/>'
               % (box.left, box.right, box.bottom, box.bottom))
    return out


def _legend(names, box, swatch, text_offset):
    """One entry per direction above the chart: `swatch(name, x, colour, dash, fill)` draws its
    mark, its label follows."""
    out = []
    for index, name in enumerate(names):
        x = box.left + 20 + 225 * index
        out.append(swatch(name, x, *DIRECTION_STYLE[name]))
        out.append('<text x="%d" y="%d" dy="4">%s</text>'
                   % (x + text_offset, box.top - 20, DIRECTION_LABEL[name]))
    return out


def _time_axis(start, end, x_of, box):
    """Vertical grid lines at round local times, with hour (or date) labels and the day."""
    out = []
    ticks, step = time_ticks(start, end)
    previous_day = None
    for tick in ticks:
        moment = datetime.datetime.fromtimestamp(tick)
        x = x_of(tick)
        out.append('<line class="grid" x1="%.1f" x2="%.1f" y1="%d" y2="%d"/>'
                   % (x, x, box.top, box.bottom))
        label = moment.strftime("%H:%M" if step < 86400 else "%d %b")
        out.append('<text x="%.1f" y="%d" text-anchor="middle">%s</text>'
                   % (x, box.bottom + 46, label))
        day = moment.strftime("%a %d %b %Y" if step < 86400 else "%Y")
        if day != previous_day:
            out.append('<text class="small" x="%.1f" y="%d" text-anchor="middle">%s</text>'
                       % (x, box.bottom + 62, day))
            previous_day = day
    return out


def _series_marks(name, points, x_of, y_of):
    """A direction's line, broken where no test ran; a lone test is a dot; a slot's p5-p95
    band shaded behind it."""
    colour, dash, _ = DIRECTION_STYLE[name]
    dashes = ' stroke-dasharray="%s"' % dash if dash else ""
    out = []
    for segment in split_at_gaps(points):
        bands = [(t, band) for t, _, band in segment if band]
        if len(bands) > 1:
            out.append('<polygon class="band %s" fill="%s" fill-opacity="0.15" stroke="none" '
                       'points="%s"/>' % (name, colour, " ".join(
                           "%.1f,%.1f" % (x_of(t), y_of(edge)) for t, edge in
                           [(t, band[1]) for t, band in bands]
                           + [(t, band[0]) for t, band in reversed(bands)])))
        if len(segment) == 1:
            out.append('<circle class="point %s" cx="%.1f" cy="%.1f" r="2.5" fill="%s"/>'
                       % (name, x_of(segment[0][0]), y_of(segment[0][1]), colour))
        else:
            out.append('<polyline class="series %s" stroke="%s"%s points="%s"/>' % (
                name, colour, dashes,
                " ".join("%.1f,%.1f" % (x_of(t), y_of(v)) for t, v, _ in segment)))
    return out


def _median_marks(name, median, label_y, y_of, box, shown=human_bps):
    colour = DIRECTION_STYLE[name][0]
    y = y_of(median)
    return ['<line class="median %s" stroke="%s" x1="%d" x2="%d" y1="%.1f" y2="%.1f"/>'
            % (name, colour, box.left, box.right, y, y),
            '<text class="small" x="%d" y="%.1f">%s median<tspan x="%d" dy="13">%s</tspan>'
            '</text>' % (box.right + 6, label_y - 2, name, box.right + 6, shown(median))]


def _failure_marks(name, failures, x_of, left, band):
    """A cross per failed test (one per FAILURE_STEP pixels, titled with the latest's error
    and the count) in the direction's band under the time axis; `failures` is [(unix seconds,
    error)]. A cross is 6 pixels wide: closer ones would only overlap (and weigh on a page of
    a year of many links)."""
    colour = DIRECTION_STYLE[name][0]
    columns = {}
    for moment, error in failures:
        if moment == moment:
            x = int(x_of(moment))
            column = columns.setdefault(x - x % FAILURE_STEP, [0, moment, error])
            column[0] += 1
            if moment >= column[1]:
                column[1:] = [moment, error]
    out = []
    if columns:
        out.append('<text class="small" x="%d" y="%d" dy="4" text-anchor="end">%s</text>'
                   % (left - 6, band, name))
    for x, (count, moment, error) in sorted(columns.items()):
        out.append('<path class="failure %s" stroke="%s" d="M%d %dl6 6m0 -6l-6 6">'
                   '<title>%s</title></path>' % (
                       name, colour, x - 3, band - 3, html.escape("%s %s failed%s: %s" % (
                           iso_time(moment), name, " (%d tests)" % count if count > 1 else "",
                           error))))
    return out


def svg_hour_chart(by_hour, names, width=SVG_WIDTH, height=250):
    """An SVG bar chart of the median received bits/s by hour of day, one bar per direction
    (dark solid for forward, light with a dark outline for reverse). `by_hour` is what
    medians_by_hour() returns."""
    box = Box(56, width - 16, 34, height - 34)
    scale = YScale([by_hour[(name, "%02d" % hour)][0] for name in names for hour in range(24)
                    if (name, "%02d" % hour) in by_hour], box)
    slot = (box.right - box.left) / 24.0
    bar = slot * 0.8 / max(len(names), 1)
    out = _svg_open(width, height, "median received throughput by hour of day, %s"
                    % scale.unit, "chart hour-chart")
    out += _y_grid(scale, box)
    for hour in range(24):
        out.append('<text class="small" x="%.1f" y="%d" text-anchor="middle">%02d</text>'
                   % (box.left + slot * (hour + 0.5), box.bottom + 16, hour))
        for index, name in enumerate(names):
            median, count = by_hour.get((name, "%02d" % hour), (None, 0))
            if median is None:
                continue
            colour, _, fill = DIRECTION_STYLE[name]
            out.append('<rect class="hour-bar %s" x="%.1f" y="%.1f" width="%.1f" height="%.1f" '
                       'fill="%s" stroke="%s"><title>%02d:00-%02d:59 %s: median %s (%d tests)'
                       '</title></rect>' % (
                           name, box.left + slot * (hour + 0.1) + bar * index,
                           scale.y_of(median), bar, box.bottom - scale.y_of(median), fill,
                           colour, hour, hour, name, human_bps(median), count))
    out.append('<text class="small" x="%d" y="%d" text-anchor="end">hour of day (local time)'
               '</text>' % (box.right, box.bottom + 30))

    def box_swatch(name, x, colour, dash, fill):
        return ('<rect class="legend %s" x="%d" y="%d" width="14" height="10" fill="%s" '
                'stroke="%s"/>' % (name, x, box.top - 25, fill, colour))
    out += _legend(names, box, box_swatch, 20)
    out.append("</svg>")
    return "\n".join(out)


def _html_table(header, rows, css, text_columns=(), wrap_column=None):
    """A table; the cells of `text_columns` are left-aligned, those of `wrap_column` wrap."""
    out = ['<div class="wide"><table class="%s"><thead><tr>' % css]
    out += ['<th%s>%s</th>' % (' class="text"' if index in text_columns or index == wrap_column
                               else "", html.escape(cell)) for index, cell in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(
            '<td%s>%s</td>' % (' class="text wrap"' if index == wrap_column else
                               ' class="text"' if index in text_columns else "",
                               html.escape(cell)) for index, cell in enumerate(row)) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def html_report(tally, links, overview, folder, prefix, since, until, now, failed_limit=100):
    """The report as one self-contained HTML page (text): inline SVG charts, no script,
    nothing fetched. The links table, the matrix of medians when the links come from several
    clients (a mesh), then each link's charts and tables, all on one time axis (one link or
    many alike). Every figure comes from the same tally as the text report's."""
    out = _html_head(folder, prefix, now)
    period_lines, span = _html_period(tally, since, until, now)
    out += period_lines
    if span is None or not links:
        out.append("</body></html>")
        return "\n".join(out) + "\n"
    anchors = ["link-%d" % number for number in range(1, len(links) + 1)]
    out += ["<h2>Links</h2>", _html_overview(overview, anchors)]
    if len({key[0] for key in links}) > 1:
        out += ["<h2>Median received: clients (rows) to servers (columns)</h2>",
                _html_matrix(links, overview)]
    # Many charts on one page: fewer slots each keeps it light (at 300, a year's line is 150
    # medians of 2.4 days each, with their bands).
    limit = max(MAX_POINTS // len(links), LINK_MIN_POINTS)
    for link, item, anchor in zip(links.values(), overview, anchors):
        out.append('<h2 id="%s" class="link">%s</h2>' % (anchor, html.escape(item["name"])))
        out += _html_link_body(link, item, span, failed_limit, "h3", limit)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_head(folder, prefix, now):
    title = "continuous-iperf report"
    return ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>%s: %s</title>" % (title, html.escape(folder)),
            "<style>%s</style></head><body>" % HTML_STYLE, "<h1>%s</h1>" % title,
            '<p class="meta">%s, %s; made %s</p>' % (
                html.escape(folder), "prefix %s" % html.escape(repr(prefix))
                if prefix is not None else "all prefixes", iso_time(now))]


def _html_period(tally, since, until, now):
    """(the page's lines about the period, or "No results"; the charts' time span (start, end),
    or None when there is nothing to draw). The axis starts with the data: a --since reaching
    before the first test says where the data starts instead."""
    moments = tally.period()
    if not moments:
        return ["<p>No results%s.</p>" % (
            " in the selected period" if since or until else "")], None
    first, last = moments
    out = []
    out.append('<p class="meta">period: %s to %s, %d runs; times are local (UTC%s)</p>' % (
        iso_time(first), iso_time(last), tally.run_count(), iso_time(last)[19:] or "+00:00"))
    if since is not None and first - since > 3600:
        out.append('<p class="meta">The selected period starts %s; the first test in it is '
                   'of %s.</p>' % (iso_time(since), iso_time(first)))
    start = first
    end = min(until, max(now, last)) if until is not None else last
    if end - start < 600:
        start, end = start - 300, end + 300
    return out, (start, end)


def _html_link_body(link, item, span, failed_limit, heading, limit=MAX_POINTS):
    summary = item["summary"]
    names, errors = list(summary), link.error_texts()
    sides = {name: link.directions[name] for name in names}
    failures = {name: [(moment, errors[number]) for moment, number in zip(
        side.failure_times, side.failure_errors)] for name, side in sides.items()}
    moments = {name: side.moments() for name, side in sides.items()}
    series = {name: chart_points(moments[name], side.received, side.failure_times, span, limit)
              for name, side in sides.items()}
    by_hour = hour_medians(item)
    out = ["<%s>Received throughput</%s>" % (heading, heading), '<div class="wide">',
           svg_time_chart(series, failures, {name: summary[name]["median_bps"]
                                             for name in names}, span[0], span[1]), "</div>"]
    if by_hour:
        out += ["<%s>Median by hour of day</%s>" % (heading, heading), '<div class="wide">',
                svg_hour_chart(by_hour, names), "</div>"]
    if any(any(map(math.isfinite, side.rtt)) for side in sides.values()):
        rtt = {name: chart_points(moments[name], side.rtt, side.failure_times, span, limit)
               for name, side in sides.items()}
        out += ["<%s>RTT under load (the mean of each test's streams)</%s>" % (
            heading, heading), '<div class="wide">', svg_time_chart(
                rtt, failures, {name: summary[name]["median_rtt_ms"] for name in names},
                span[0], span[1], what="RTT under load", unit="ms"), "</div>"]
    parts = _html_summary(summary) + _html_beyond(summary, link) + _html_failed(
        link, sum(stats["failed"] for stats in summary.values()), failed_limit)
    return out + [part.replace("<h2>", "<%s>" % heading).replace("</h2>", "</%s>" % heading)
                  for part in parts]


def _html_beyond(summary, link):
    """The table of latency, UDP and traffic figures, when the tests have any."""
    keys = ("median_rtt_ms", "median_min_rtt_ms", "added_delay_ms", "latency_grade",
            "median_jitter_ms", "median_lost_percent", "lost_percent")
    traffic = ["<p>%s</p>" % html.escape(line) for line in traffic_lines(summary, link) if line]
    if all(stats[key] is None for stats in summary.values() for key in keys):
        return traffic
    shown = (_ms, _ms, _ms, lambda grade: grade or "-", _ms, _percent, _percent)
    return ["<h2>Latency, loss and jitter</h2>", _html_table(
        ("direction", "median RTT", "base RTT", "added by the load", "grade (approx.)",
         "median jitter", "loss, median test", "loss, all packets"),
        [[name] + [show(stats[key]) for key, show in zip(keys, shown)]
         for name, stats in summary.items()], "beyond", (0,))] + traffic


def _html_overview(overview, anchors):
    """The links table: one row a link, its name a link to its section."""
    names = list(overview[0]["median_bps"]) if overview else []
    out = ['<div class="wide"><table class="overview"><thead><tr><th>link</th>']
    out += ["<th>median %s</th>" % name for name in names]
    out += ["<th>failed %</th><th class=\"text\">latest test</th><th>age</th></tr></thead>"
            "<tbody>"]
    for item, anchor in zip(overview, anchors):
        failed = item["latest_status"] != "ok"
        out.append('<tr><td><a href="#%s">%s</a></td>' % (anchor, html.escape(item["name"])))
        out += ["<td>%s</td>" % human_bps(item["median_bps"][name]) for name in names]
        out.append('<td>%.1f</td><td class="text%s">%s%s</td><td>%s</td></tr>' % (
            item["failed_percent"], " bad" if failed else "",
            html.escape(item["latest"][:10] + " " + item["latest"][11:19]),
            " (%s)" % item["latest_status"] if failed else "", html.escape(_age_text(
                item["age_s"]).replace(" ago", ""))))
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _html_matrix(links, overview):
    """The mesh's medians: a row per client, a pair of columns (one a direction) per server."""
    names = list(overview[0]["median_bps"]) if overview else []
    clients = sorted({key[0] for key in links})
    servers = sorted({(key[1], key[2], key[3]) for key in links},
                     key=lambda item: (item[0], int(item[1]) if item[1].isdigit() else 0, item[2]))
    medians = {key: item["median_bps"] for key, item in zip(links, overview)}
    out = ['<div class="wide"><table class="matrix"><thead><tr><th rowspan="2">client</th>']
    out += ['<th colspan="%d" class="server">%s</th>' % (len(names), html.escape(
        (target_name(server, port) if server else "server unknown")
        + (" UDP" if protocol == "udp" else ""))) for server, port, protocol in servers]
    out.append("</tr><tr>" + "".join("<th>%s</th>" % name for _ in servers for name in names)
               + "</tr></thead><tbody>")
    for client in clients:
        cells = []
        for server, port, protocol in servers:
            figures = medians.get((client, server, port, protocol))
            cells += ["<td>%s</td>" % (human_bps(figures[name]) if figures else "")
                      for name in names]
        out.append("<tr><td>%s</td>%s</tr>" % (html.escape(client or "?"), "".join(cells)))
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _html_summary(summary):
    return ["<h2>Summary</h2>", _html_table(
        ("direction", "tests", "ok", "failed", "failed %", "skipped runs", "median", "mean",
         "p5", "p95", "min", "max", "retransmits"),
        [[name, str(stats["count"]), str(stats["ok"]), str(stats["failed"]),
          "%.1f" % (100.0 * stats["failed"] / stats["count"]) if stats["count"] else "-",
          str(stats["skipped"])]
         + [human_bps(stats[key]) for key in
            ("median_bps", "mean_bps", "p5_bps", "p95_bps", "min_bps", "max_bps")]
         + [str(stats["retransmits"])] for name, stats in summary.items()], "summary", (0,))]


def _html_failed(link, total, limit):
    """The table of the latest `limit` failed tests, newest first."""
    if not total:
        return ["<h2>Failed runs</h2>", "<p>None.</p>"]
    shown = list(link.failures)[-limit:][::-1]
    return ["<h2>Failed runs</h2>", "<p>%s, newest first.</p>" % (
        "All %d" % total if total <= len(shown) else "The latest %d of %d" % (len(shown), total)),
        _html_table(("time", "direction", "error", "file"), [
            [stamp[:10] + " " + stamp[11:19], direction, error, name]
            for stamp, direction, error, name in shown], "failed", (0, 1, 3), 2)]


# --- Pure helpers: the Prometheus textfile --------------------------------------------------------

def _prom_escape(value):
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prom_unescape(value):
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_textfile(text):
    """Our metrics' samples in a textfile we wrote: [(metric, {label: value}, value text)].
    Lines of other metrics and comments are left out (the file is ours alone)."""
    ours = {metric for metric, _, _ in PROMETHEUS_METRICS}
    samples = []
    for line in text.splitlines():
        match = _PROM_SAMPLE_RE.match(line)
        if not match or line.startswith("#") or match.group(1) not in ours:
            continue
        labels = {key: _prom_unescape(value)
                  for key, value in _PROM_LABEL_RE.findall(match.group(2) or "")}
        samples.append((match.group(1), labels, match.group(3)))
    return samples


def _prom_number(cell):
    """A ledger cell as a sample value: the integer or the float's exact repr; None if empty."""
    try:
        return str(int(cell))
    except ValueError:
        values = _floats([cell])
        return repr(values[0]) if values else None


def run_samples(rows, failures=None):
    """The samples of one run: `rows` are its ledger rows, one per test that ran, labelled by
    each row's own client, target label, server and port (a run of several targets gives each
    its series) and, for UDP tests, protocol="udp" (TCP's series keep the labels they had).
    `failures` maps a test's series key (_prom_test_key) to its failures in a row before this
    run, read back from the file.

    A failed test gives success 0 and no figures (0 bits/s would be a lie that drags averages
    down); a figure the test does not have (RTT of a UDP test) gives no series.
    """
    failures = failures or {}
    samples, starts = [], {}
    for row in rows:
        target = _prom_target(row)
        moment = row_time(row[Col.TIMESTAMP])
        key = tuple(sorted(target.items()))
        if moment is not None and moment < starts.get(key, (float("inf"),))[0]:
            starts[key] = (moment, target)
        labels = dict(target, direction=row[Col.DIRECTION])
        ok = row[Col.STATUS] == "ok"
        samples.append(("iperf_success", labels, "1" if ok else "0"))
        in_a_row = 0 if ok else failures.get(_prom_test_key(labels), 0) + 1
        samples.append(("iperf_consecutive_failures", labels, str(in_a_row)))
        for index, factor in PROMETHEUS_VALUES if ok else ():
            metric, column, _ = PROMETHEUS_METRICS[index]
            cell = row[LEDGER_COLUMNS.index(column)]
            value = _prom_number(cell) if factor == 1 else _prom_scaled(cell, factor)
            if value is not None:
                samples.append((metric, labels, value))
        samples += _grade_samples(row, labels) if ok else []
    return [("iperf_last_run_timestamp_seconds", target, _prom_number(str(moment)))
            for moment, target in starts.values()] + samples


def _grade_samples(row, labels):
    """The added delay under load of a test's row (mean RTT minus lowest, the report's figure)
    and its grade, as samples; none without both RTT figures (UDP, a text daemon's reverse)."""
    mean, low = _floats([row[Col.MEAN_RTT_MS]]), _floats([row[Col.MIN_RTT_MS]])
    if not (mean and low):
        return []
    added_ms = max(0.0, mean[0] - low[0])
    return [("iperf_added_delay_seconds", labels, repr(float("%.12g" % (added_ms / 1000.0)))),
            ("iperf_latency_grade", dict(labels, grade=latency_grade(added_ms)), "1")]


def _prom_target(row):
    target = {"client": row[Col.CLIENT], "label": row[Col.LABEL], "server": row[Col.SERVER],
              "port": row[Col.PORT]}
    if row[Col.PROTOCOL] == "udp":
        target["protocol"] = "udp"
    return target


def _prom_link_key(labels):
    """The link a series belongs to: (client, server, port, protocol). A series written by
    version 2.2 has no client label: None. The target's label is left out, so a renamed target
    replaces its series."""
    return (labels.get("client"), labels.get("server"), labels.get("port"),
            labels.get("protocol", "tcp"))


def _prom_test_key(labels):
    return _prom_link_key(labels) + (labels.get("direction"),)


def _prom_scaled(cell, factor):
    values = _floats([cell]) if cell else []
    # 12 significant digits: the ledger's own figures are shorter; no 0.08719750000000001
    return repr(float("%.12g" % (values[0] * factor))) if values else None


def _replaced(labels, tested, links):
    """True for an existing series that this run's tests replace: one of a link and direction
    tested (or the link's series without a direction), and, once, version 2.2's series of the
    same server, port and protocol, which had no client label."""
    link = _prom_link_key(labels)
    if link[0] is None and link[1:] in {known[1:] for known in links}:
        return True
    return link in links and ("direction" not in labels or _prom_test_key(labels) in tested)


def prometheus_text(existing, rows):
    """The new textfile: `existing` (the file's text, "" when new) with the series of this run's
    links (client, server, port and protocol of its `rows`) replaced by their samples; other
    clients' series are kept. A direction this run did not test (stopped by a signal) keeps its
    last series. A test's failures in a row carry on from the file's count."""
    tested = {_prom_test_key(dict(_prom_target(row), direction=row[Col.DIRECTION]))
              for row in rows}
    links = {test[:4] for test in tested}
    kept, failures = [], {}
    for metric, labels, value in parse_textfile(existing):
        if not _replaced(labels, tested, links):
            kept.append((metric, labels, value))
        elif metric == "iperf_consecutive_failures" and value.isdigit():
            failures[_prom_test_key(labels)] = int(value)
    samples = kept + run_samples(rows, failures)
    lines = []
    for metric, _, help_text in PROMETHEUS_METRICS:
        lines += ["# HELP %s %s" % (metric, help_text), "# TYPE %s gauge" % metric]
        mine = [(labels, value) for name, labels, value in samples if name == metric]
        mine.sort(key=lambda item: tuple(item[0].get(key, "") for key in PROMETHEUS_LABELS))
        for labels, value in mine:
            lines.append("%s{%s} %s" % (metric, ",".join(
                '%s="%s"' % (key, _prom_escape(labels[key])) for key in PROMETHEUS_LABELS
                if key in labels), value))
    return "\n".join(lines) + "\n"


# --- Pure helpers: the monitoring check (Nagios/Icinga plugin conventions) ------------------------

def usual_interval(rows):
    """The usual interval between runs, in seconds: the median gap between the starts of
    consecutive runs of each prefix (the largest over prefixes), read from the latest rows.
    None with fewer than three runs."""
    starts = {}
    for row in rows[-INTERVAL_ROWS:]:
        moment = row_time(row[Col.TIMESTAMP])
        key = (row[Col.CLIENT], row[Col.PREFIX], row[Col.RUN])
        if moment is not None and moment < starts.get(key, float("inf")):
            starts[key] = moment
    by_prefix = {}
    for (client, prefix, _), moment in starts.items():
        by_prefix.setdefault((client, prefix), []).append(moment)
    usual = None
    for moments in by_prefix.values():
        moments.sort()
        gaps = sorted(b - a for a, b in zip(moments, moments[1:]))
        if len(gaps) >= 2:
            usual = max(usual or 0.0, percentile(gaps, 0.5))
    return usual


def default_max_age(rows):
    """--max-age's default in minutes: three usual intervals between runs, else 15."""
    usual = usual_interval(rows)
    return MAX_AGE_RUNS * usual / 60.0 if usual else MAX_AGE_FALLBACK


def _perf_number(value):
    return "%d" % round(value) if abs(value - round(value)) < 1e-6 else "%.3f" % value


# What --check judges by; a threshold left out (None) is not judged. drop and rise are
# (warning %, critical % or None); baseline is in seconds.
CheckLimits = collections.namedtuple("CheckLimits", (
    "warn_bps", "crit_bps", "warn_loss", "crit_loss", "drop", "rise", "recent", "baseline",
    "consecutive", "max_age"))


def check_result(rows, directions, limits, now):
    """(state, status line) of the check over the selected rows (one link).

    Per direction, its latest test: CRITICAL when it failed or started more than max_age
    minutes before `now`; below crit_bps / warn_bps (TCP) or above crit_loss / warn_loss % lost
    (UDP): CRITICAL / WARNING; UNKNOWN when the direction has no test. With drop or rise, also
    against the link's own normal (see judge_relative). Performance data for both, in bits/s
    with Nagios ranges ("N:" alerts below N); "U" when there is no figure.
    """
    state, notes, perf, age = judge_link(rows, directions, limits, now)
    if not notes:
        return "UNKNOWN", "UNKNOWN - no results"
    # A "|" in an error message would start the performance data early.
    return state, "%s - %s; latest test %s | %s" % (
        state, ", ".join(text for _, text in notes).replace("|", "/"), age, " ".join(perf))


def check_links(links, names, directions, limits, now):
    """(state, status line) over several links: each judged as check_result judges one; the
    worst state wins and its link is named first (a monitoring view often shows only the start
    of the line); performance data for every link, labelled by link and direction."""
    judged = []
    for key, rows in links.items():
        state, notes, perf, _ = judge_link(rows, directions, limits, now)
        if not notes:
            state, notes = "UNKNOWN", [("UNKNOWN", "no results")]
        tag = re.sub(r"[^A-Za-z0-9.-]+", "_", names[key]).strip("_")
        judged.append((CHECK_RANK.index(state), names[key], state, notes,
                       ["%s_%s" % (tag, item) for item in perf]))
    judged.sort(key=lambda item: -item[0])
    state = judged[0][2]
    counts = collections.Counter(item[2] for item in judged)
    summary = "%d links: %s" % (len(judged), ", ".join(
        "%d %s" % (counts[level], level) for level in reversed(CHECK_RANK) if counts[level]))
    # A link in trouble says why; an OK one says so only, unless all are OK: then its figures.
    parts = ["%s: %s" % (name, ", ".join(text for level, text in notes if level != "OK")
                         if state != "OK" else ", ".join(text for _, text in notes))
             if level != "OK" or state == "OK" else "%s: OK" % name
             for _, name, level, notes, _ in judged]
    line = "%s - %s; %s" % (state, summary, "; ".join(parts))
    return state, "%s | %s" % (line.replace("|", "/"), " ".join(
        item for judged_link in judged for item in judged_link[4]))


def judge_link(rows, directions, limits, now):
    """(state, notes [(state, text)] worst first, performance data items, the latest test's age
    as text) of one link's rows. Skipped runs are no tests, but a run skipped after the latest
    test is a WARNING: measurements are being lost."""
    latest, skipped = {}, None  # the last row of each direction in ledger order: the latest written
    future = None
    for row in rows:
        moment = row_time(row[Col.TIMESTAMP])
        name = row[Col.DIRECTION]
        if moment is None or name not in directions:
            continue
        if row[Col.STATUS] == "skipped":
            skipped = row
            continue
        latest[name] = (moment, row)
        skipped = None
        if moment > now + FUTURE_SLACK:
            future = row
    if not latest:
        return "UNKNOWN", [], [], ""
    notes, perf = [], []  # notes: (state, text)
    if future is not None:
        # A clock jumped: a test dated later than any real one must not pass for the latest.
        notes.append(("WARNING", "a test is dated in the future (%s, %s ahead): a clock is "
                                 "off" % (future[Col.TIMESTAMP],
                                          _in_minutes(row_time(future[Col.TIMESTAMP]) - now))))
    if skipped is not None:
        notes.append(("WARNING", "the latest run was skipped at %s: %s" % (
            skipped[Col.TIMESTAMP], one_line(skipped[Col.ERROR], 200))))
    if limits.max_age is None:  # two links of one folder may run on different schedules
        limits = limits._replace(max_age=default_max_age(rows))
    for name in directions:
        direction_notes, direction_perf = _judge_direction(rows, name, latest.get(name), limits,
                                                           now)
        notes += direction_notes
        perf += direction_perf
    newest = max(moment for moment, _ in latest.values())
    age = ("%s ago" % _in_minutes(max(0.0, now - newest)) if newest <= now + FUTURE_SLACK
           else "%s in the future" % _in_minutes(newest - now))
    state = max((note[0] for note in notes), key=CHECK_RANK.index)
    notes.sort(key=lambda note: -CHECK_RANK.index(note[0]))
    return state, notes, perf, age


def _judge_direction(rows, name, latest, limits, now):
    """(notes [(state, text)], performance data items) of a direction: its latest test
    (moment, row) or None, its age, and the relative checks asked for."""
    notes, perf = [], []
    figure, udp = None, False
    if latest is None:
        notes.append(("UNKNOWN", "%s: no result" % name))
    else:
        moment, row = latest
        udp = row[Col.PROTOCOL] == "udp"
        if row[Col.STATUS] != "ok":  # whatever the protocol
            note = ("CRITICAL", "%s test failed at %s: %s" % (
                name, row[Col.TIMESTAMP], one_line(row[Col.ERROR], 200)))
        else:
            figure, note = (_judge_latest_udp if udp else _judge_latest)(name, row, limits)
        notes.append(note)
        if now - moment > limits.max_age * 60:
            notes.append(("CRITICAL", "%s: latest test %s old (max %s)" % (
                name, _in_minutes(now - moment), _in_minutes(limits.max_age * 60))))
    if udp:
        loss = "U" if figure is None else _perf_number(figure)
        perf.append("%s_loss=%s%%;%s;%s" % (name, loss, _perf_limit(limits.warn_loss),
                                            _perf_limit(limits.crit_loss)))
    else:
        perf.append("%s=%s;%s;%s" % (name, "%d" % round(figure) if figure is not None else "U",
                                     _perf_limit(limits.warn_bps, ":"),
                                     _perf_limit(limits.crit_bps, ":")))
    for column, bounds, lower in ((Col.RECEIVED_BPS, limits.drop, True),
                                  (Col.MEAN_RTT_MS, limits.rise, False)):
        if bounds is not None and not udp:  # a UDP test's rate is the one it was asked for
            note, item = judge_relative(rows, name, column, bounds, lower, limits)
            notes.append(note)
            perf.append(item)
    return notes, perf


def _perf_limit(value, suffix=""):
    return "" if value is None else _perf_number(value) + suffix


def _judge_latest(name, row, limits):
    """(its received bits/s or None, (state, text)) of a direction's latest ok TCP test."""
    values = _floats([row[Col.RECEIVED_BPS]])
    if not values:
        return None, ("UNKNOWN", "%s: no throughput figure" % name)
    figure = values[0]
    for state, limit in (("CRITICAL", limits.crit_bps), ("WARNING", limits.warn_bps)):
        if limit is not None and figure < limit:
            return figure, (state, "%s %s < %s" % (name, human_bps(figure), human_bps(limit)))
    return figure, ("OK", "%s %s" % (name, human_bps(figure)))


def _judge_latest_udp(name, row, limits):
    """(its loss % or None, (state, text)) of a direction's latest ok UDP test: loss and jitter
    are what a UDP test is for; its rate is the one asked for (throughput limits are TCP's)."""
    loss = _floats([row[Col.LOST_PERCENT]]) if row[Col.LOST_PERCENT] else []
    if not loss:
        return None, ("UNKNOWN", "%s: no UDP loss figure" % name)
    jitter = _floats([row[Col.JITTER_MS]]) if row[Col.JITTER_MS] else []
    lost = "%s UDP %s lost" % (name, _percent(loss[0]))
    jitter = ", jitter %s" % _ms(jitter[0] if jitter else None)
    for state, limit in (("CRITICAL", limits.crit_loss), ("WARNING", limits.warn_loss)):
        if limit is not None and loss[0] > limit:
            return loss[0], (state, "%s > %s%%%s" % (lost, _perf_number(limit), jitter))
    return loss[0], ("OK", lost + jitter)


def judge_relative(rows, name, column, bounds, lower, limits):
    """((state, text), performance data item) of a direction against its own normal: the
    median of its latest `recent` ok tests against the median of the ok tests of the `baseline`
    seconds before them. With `lower` (throughput), WARNING / CRITICAL when it is below
    bounds[0] / bounds[1] % of the baseline; else (RTT under load) when it is more than that %
    above it. Raised only when each of the latest `consecutive` tests is beyond the bound too,
    so that one dip does not page anyone. UNKNOWN when the baseline has < `recent` tests."""
    what = "throughput" if lower else "RTT"
    tests = []
    for row in rows:
        if row[Col.DIRECTION] == name and row[Col.STATUS] == "ok" and row[column]:
            values, moment = _floats([row[column]]), row_time(row[Col.TIMESTAMP])
            if values and moment is not None:
                tests.append((moment, values[0]))
    window = format_span(limits.baseline)
    label = "%s_%s_vs_%s" % (name, "throughput" if lower else "rtt", window)
    if not tests and not lower:  # a server that sends no RTT (a daemon without JSON)
        return ("OK", "%s RTT: no figures to compare" % name), "%s=U" % label
    if len(tests) < limits.recent:
        return ("UNKNOWN", "%s %s: fewer than %d recent tests" % (name, what, limits.recent)), (
            "%s=U" % label)
    recent = [value for _, value in tests[-limits.recent:]]
    begin = tests[-limits.recent][0]
    base = sorted(value for moment, value in tests[:-limits.recent]
                  if begin - limits.baseline <= moment < begin)
    if len(base) < limits.recent:
        return ("UNKNOWN", "%s %s: no baseline (%d ok tests in the %s before the latest %d)" % (
            name, what, len(base), window, limits.recent)), "%s=U" % label
    normal, latest = percentile(base, 0.5), percentile(sorted(recent), 0.5)
    if not normal:  # no ratio to a zero (perfdata has no "inf%")
        return ("UNKNOWN", "%s %s: the %s baseline median is 0: nothing to compare with" % (
            name, what, window)), "%s=U" % label
    percent = 100.0 * latest / normal
    state = "OK"
    for level, bound in zip(("WARNING", "CRITICAL"), bounds):
        if bound is None:
            continue
        limit = normal * (bound / 100.0 if lower else 1 + bound / 100.0)
        beyond = (lambda value: value < limit) if lower else (lambda value: value > limit)
        streak = next((index for index, (_, value) in enumerate(reversed(tests))
                       if not beyond(value)), len(tests))
        if beyond(latest) and streak >= limits.consecutive:
            state = level
    shown = human_bps if lower else _ms
    text = "%s %s: median of the latest %d %s = %.1f%% of the %s baseline median %s (%d test%s)" % (
        name, what, limits.recent, shown(latest), percent, window, shown(normal), len(base),
        "" if len(base) == 1 else "s")
    return (state, text), "%s=%.1f%%;%s;%s" % (label, percent, *(
        "" if bound is None else ("%s:" % _perf_number(bound)) if lower
        else "~:%s" % _perf_number(100 + bound) for bound in bounds))


def format_span(seconds):
    """604800 -> "7d", 7200 -> "2h", 5400 -> "90m": a --baseline span as it may be written."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%gs" % seconds


# --- The run: its files and its log ---------------------------------------------------------------

def write_textfile(path, rows, wait=10.0):
    """Merge this run's `rows` into the Prometheus textfile at `path`, atomically.

    Clients sharing the file take turns on a flock of its folder (a lock file would be left in
    node_exporter's folder, and the textfile itself is replaced at every write); each reads the
    file, replaces its own series and renames a new file into place. Raises OSError.
    """
    folder = os.path.dirname(path) or "."
    fd = locked(folder, wait, flags=os.O_RDONLY)
    if fd is None:
        raise OSError(errno.EWOULDBLOCK, "its folder stayed locked for %s s" % wait)
    try:
        existing = ""
        if output_target(path)[0] == "replace":  # a FIFO is not read: it would wait for ever
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    existing = handle.read()
            except FileNotFoundError:
                pass
        write_atomic(path, prometheus_text(existing, rows).encode("utf-8"))
    finally:
        os.close(fd)


def open_log(path):
    """A run's log file, opened for appending: created with file_mode() (never world-writable,
    whatever the umask) and never through a symlink planted at its predictable name."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_NOFOLLOW, file_mode())
    return os.fdopen(fd, "a", encoding="utf-8", errors="replace")


class RunLogHandler(logging.StreamHandler):
    """A run's log file (see open_log). A write that fails (a full disk) is said once on
    stderr, naming the file, then logging there stops: never a traceback per message."""

    def __init__(self, path):
        super().__init__(open_log(path))
        self.path = path
        self.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        self.setLevel(logging.DEBUG)

    def handleError(self, record):
        error = sys.exc_info()[1]
        self.setLevel(logging.CRITICAL + 10)
        say_warning("cannot write the log %s: %s; not logging there any more"
                    % (self.path, getattr(error, "strerror", None) or error))

    def close(self):
        super().close()
        try:  # a StreamHandler leaves its stream open; closing flushes, which may fail too
            self.stream.close()
        except OSError:
            pass


@contextlib.contextmanager
def logging_to(handler):
    """`log`'s records also go to `handler` for the `with` block; then it is detached and
    closed, whatever happened: a run's handlers live as long as the run, never longer."""
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        handler.close()


def take_lock(folder):
    """Take the exclusive lock of a results folder, waiting for a run in progress (said on
    stderr); return its open fd (keep it open). For --rebuild."""
    return locked(os.path.join(folder, LOCK_NAME), None,
                  on_wait=lambda: say("waiting for the run in progress in %s" % folder))


def read_password(password_file, environ):
    """The password: the first line of `password_file` (which only its owner may read, as ssh
    wants of keys), else $IPERF3_PASSWORD. Raises IperfError when there is none: iperf3 would
    prompt for one, and under cron there is no terminal to answer."""
    if password_file:
        path = os.path.abspath(os.path.expanduser(password_file))
        try:
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_mode & 0o077:
                    raise IperfError("password file %s is readable by others: chmod 600 %s"
                                     % (path, path))
                password = handle.readline().rstrip(b"\r\n").decode("utf-8")
        except UnicodeError:
            raise IperfError("the password in %s is not UTF-8 text" % path)
        except OSError as exc:
            raise IperfError("cannot read password file %s: %s" % (path, exc.strerror))
        source = "the first line of %s" % path
    else:
        password = environ.get(PASSWORD_VARIABLE)
        if password is None:
            raise IperfError("--username needs a password: set %s in the environment or give "
                             "--password-file FILE" % PASSWORD_VARIABLE)
        source = PASSWORD_VARIABLE
    if not password:
        raise IperfError("the password in %s is empty" % source)
    if any(c.isspace() for c in password):
        raise IperfError("the password in %s contains whitespace, which iperf3 cannot carry"
                         % source)
    return password


def run_timestamp(folder, prefix, labels=("",)):
    """This run's local timestamp; waits for the next second if that one's files exist already
    (a run that failed fast in the same second must not be overwritten)."""
    while True:
        stamp = time.strftime(TIMESTAMP_FORMAT)
        names = [result_name(prefix, stamp, suffix, compress, label)
                 for _, suffix, _ in DIRECTIONS for compress in (False, True) for label in labels]
        names.append(prefix + stamp + "_iperf_mon.log")
        if not any(os.path.exists(os.path.join(folder, name)) for name in names):
            return stamp
        time.sleep(1.05 - (time.time() % 1))


def delete_old_files(folder, prefix, keep_days, now=None):
    """Delete this prefix's result and log files whose run (the `<ts>` in the name) is older than
    `keep_days` days; the ledger keeps their rows. Returns the names deleted."""
    limit = (time.time() if now is None else now) - keep_days * 86400
    pattern = re.compile(RUN_FILE_RE % re.escape(prefix))
    deleted, failed = [], []
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        moment = run_time(match.group("run")) if match else None
        if moment is not None and moment < limit:
            try:
                os.unlink(os.path.join(folder, name))
                deleted.append(name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append("%s: %s" % (name, exc.strerror))
    if failed:  # the run itself succeeded: say it once, not once per file
        log.error("could not delete %d old files (%s%s)", len(failed), failed[0],
                  ", ..." if len(failed) > 1 else "")
    return deleted


# --- The run: its tests ---------------------------------------------------------------------------

def run(settings, stopper):
    """One run: lock, timestamp, log file, each target's forward then reverse test, ledger rows.

    Returns the exit code; raises IperfError for what stops a run before any test.
    """
    try:
        os.makedirs(settings.results_dir, mode=0o775, exist_ok=True)  # never world-writable
    except OSError as exc:
        raise IperfError("cannot create results folder %s: %s"
                         % (settings.results_dir, exc.strerror))
    started = time.monotonic()
    lock_fd = take_run_lock(settings, stopper)
    try:
        labels = [target.label for target in settings.targets] if several(settings) else [""]
        run_ts = run_timestamp(settings.results_dir, settings.prefix, labels)
        log_path = os.path.join(settings.results_dir, settings.prefix + run_ts + "_iperf_mon.log")
        with logging_to(RunLogHandler(log_path)):
            return run_logged(settings, stopper, run_ts, started)
    finally:
        os.close(lock_fd)


def run_logged(settings, stopper, run_ts, started):
    """The run's tests and their rows, with its log file open (see run)."""
    log.info("run %s: %s, %s s x %s streams, iperf3 %s, version %s", run_ts,
             ", ".join("%s (%s)" % (target_name(target.host, target.port), target.label)
                       for target in settings.targets), settings.duration, settings.streams,
             settings.iperf3, __version__)
    say_when_too_long(settings, time.monotonic() - started)
    if settings.jitter > 0:
        delay = random.uniform(0, settings.jitter)
        log.info("jitter: sleeping %.1f s", delay)
        stopper.sleep(delay)
    rows, status = run_tests(settings, run_ts, stopper)
    return finish_run(settings, run_ts, rows, status, stopper)


def several(settings):
    """True when the run tests several targets (their files then carry their labels)."""
    return len(settings.targets) > 1


def run_seconds(settings):
    """About how long a run's tests take: targets x 2 x (duration + omit + set-up)."""
    return len(settings.targets) * len(DIRECTIONS) * (
        settings.duration + omit_seconds(settings.extra) + TEST_SETUP)


def lock_wait(settings):
    """How long a run waits for another holding the folder: --lock-wait, else what its interval
    leaves over after its own tests and jitter (so it still ends before the next run starts)."""
    if settings.lock_wait is not None:
        return settings.lock_wait
    return max(0.0, settings.interval - run_seconds(settings) - settings.jitter)


def take_run_lock(settings, stopper):
    """The results folder's lock (an open fd), waited for up to lock_wait(settings). A run that
    still cannot have it is recorded as skipped rows (one per target and direction, so the
    report counts it) and raises IperfError with status 75."""
    wait = lock_wait(settings)
    path = os.path.join(settings.results_dir, LOCK_NAME)
    fd = locked(path, wait, stopper, on_wait=lambda: log.info(
        "another run holds %s: waiting up to %s s", settings.results_dir, plain_number(wait)))
    if fd is not None:
        return fd
    if stopper.signum is not None:
        raise IperfError("stopped by %s while waiting for the run in progress in %s"
                         % (stopper.name, settings.results_dir), 128 + stopper.signum)
    reason = ("another run held the results folder for the %s s this run could wait (lock %s; "
              "see --lock-wait, --interval)" % (plain_number(wait), path))
    record_skipped(settings, reason)
    raise IperfError("%s: this run was skipped; its tests are in the ledger as skipped" % reason,
                     EX_TEMPFAIL)


def record_skipped(settings, reason):
    """Ledger rows for a run that could not start: status "skipped", no result file."""
    run_ts = time.strftime(TIMESTAMP_FORMAT)
    for target in settings.targets:
        for direction, _, _ in DIRECTIONS:
            cells = dict(timestamp=iso_time(time.time()), run=run_ts, prefix=settings.prefix,
                         direction=direction, server=target.host, port=target.port,
                         streams=settings.streams, duration=settings.duration, status="skipped",
                         error=reason, attempts=0, client=settings.client, label=target.label,
                         protocol=settings.protocol)
            append_ledger(os.path.join(settings.results_dir, LEDGER_NAME),
                          [str(cells.get(column, "")) for column in LEDGER_COLUMNS])


def say_when_too_long(settings, waited):
    """One line (stderr and the log) when this run's tests cannot end before the next run is
    due: that one would then wait for the lock, and a fleet's schedule slips."""
    needed = round(run_seconds(settings) + settings.jitter)
    left = round(settings.interval - waited)
    if needed > left:
        log.error("this run needs about %s s (%d target%s x %d tests x (%s s + %s s set-up)%s) "
                  "but has %s s left of its %s s interval (--interval): it will overrun",
                  plain_number(needed), len(settings.targets),
                  "" if len(settings.targets) == 1 else "s", len(DIRECTIONS),
                  plain_number(settings.duration + omit_seconds(settings.extra)),
                  plain_number(TEST_SETUP), " + jitter %s s" % plain_number(settings.jitter)
                  if settings.jitter else "", plain_number(max(0.0, left)),
                  plain_number(settings.interval))


def run_tests(settings, run_ts, stopper):
    """The run's tests, each target's forward then reverse, targets in a new random order each
    run (none always first or last); each test is recorded in its file and the ledger as soon as
    it ends. Returns (their ledger rows, 0 or 1 when one failed or was not saved)."""
    progress = None
    if sys.stderr.isatty() and settings.quiet == 0:
        progress = Progress(sys.stderr, settings.duration)
    status = 0
    rows = []
    ledger = os.path.join(settings.results_dir, LEDGER_NAME)
    unwritable = ledger_problem(ledger)  # said before the first test; every test still runs
    if unwritable:
        log.error("%s", unwritable)
    for target in random.sample(settings.targets, len(settings.targets)):
        for direction, suffix, flags in DIRECTIONS:
            if stopper.signum is not None:
                return rows, status
            file_name = result_name(settings.prefix, run_ts, suffix, settings.compress,
                                    target.label if several(settings) else "")
            document = run_test(settings, target, direction, bool(flags),
                                os.path.join(settings.results_dir, file_name), run_ts, stopper,
                                progress(direction) if progress else None)
            if progress:
                progress.clear()
            rows.append(ledger_row(document, file_name))
            try:
                append_ledger(ledger, rows[-1])
            except (OSError, IperfError) as exc:
                # The result file is the record: the run goes on, says it once, exits 73.
                if not unwritable:
                    unwritable = ledger_remedy(ledger, exc)
                    log.error("%s", unwritable)
                status = max(status, EX_CANTCREAT)
            status = max(status, _test_status(settings, target, direction, document))
    return rows, status


def ledger_problem(path):
    """Why a run cannot append to the ledger at `path` (see ledger_remedy), or None when it
    can: it is opened for appending as an append opens it (never following a symlink), and
    nothing is written. A missing ledger is no problem: the first append creates it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        if os.path.islink(path):
            return ledger_remedy(path, OSError(errno.ENOENT, "a symbolic link to nothing"))
        return None
    except OSError as exc:
        return ledger_remedy(path, exc)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device takes no ledger
            return ledger_remedy(path, OSError(errno.EINVAL, "not a regular file"))
    finally:
        os.close(fd)
    return None


def ledger_remedy(path, exc):
    """One line: the ledger `path` cannot take this run's rows (`exc` says why), what fixes it,
    and that the tests are kept in their result files for 'report --rebuild'."""
    culprit = getattr(exc, "filename", None) or path
    if os.path.islink(culprit):
        fix = "it is a symbolic link (to %s), which a run never follows: put the file itself " \
              "there" % os.readlink(culprit)
    elif os.path.isdir(culprit):
        fix = "it is a directory: move it away"
    elif os.path.exists(culprit) and not os.path.isfile(culprit):
        fix = "it is not a regular file (a FIFO, a device): move it away"
    elif getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on its file system"
    elif getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
        fix = "give it back to the user of the runs (e.g. after a 'report --rebuild' as root: " \
              "chown %d:%d %s)" % (os.geteuid(), os.getegid(), culprit)
    else:
        fix = "make it writable"
    return ("cannot append to the ledger %s: %s; %s; every test of this run is still measured "
            "and kept in its result file: once fixed, 'iperf_client.py report --rebuild' puts "
            "them in the ledger" % (culprit, getattr(exc, "strerror", None) or exc, fix))


def _test_status(settings, target, direction, document):
    """0, or 1 (said) when the test failed or its file could not be saved."""
    if "error" not in document:
        return 1 if "unsaved" in document["continuous_iperf"] else 0
    logged_in = settings.username is not None
    log.error("%s test%s failed: %s", direction, " of %s (%s)" % (
        target.label, target_name(target.host, target.port)) if several(settings) else "",
        explain_error(document["error"], document["continuous_iperf"]["stderr"],
                      settings.iperf3_version() if logged_in else None, logged_in))
    return 1


def finish_run(settings, run_ts, rows, status, stopper):
    """After the tests: the Prometheus textfile, old files deleted; returns the exit code."""
    if settings.prometheus_textfile and rows:
        try:
            write_textfile(settings.prometheus_textfile, rows)
        except OSError as exc:
            status = status or 1
            log.error("cannot write the Prometheus textfile %s: %s",
                      settings.prometheus_textfile, exc.strerror or exc)
    if stopper.signum is not None:
        log.warning("stopped by %s", stopper.name)
        return 128 + stopper.signum
    if settings.keep_days:
        deleted = delete_old_files(settings.results_dir, settings.prefix, settings.keep_days)
        log.info("deleted %d files older than %d days (their ledger rows stay)",
                 len(deleted), settings.keep_days)
    log.info("run %s finished: %s", run_ts, "ok" if status == 0 else "a test failed"
             if status == 1 else "the ledger could not take its rows")
    return status


class Progress:
    """A single updating line on a terminal: direction and seconds elapsed of the total."""

    def __init__(self, stream, total):
        self.stream = stream
        self.total = total
        self.shown = False

    def __call__(self, direction):
        def show(elapsed):
            self.stream.write("\r%s: %d/%d s " % (direction, elapsed, self.total))
            self.stream.flush()
            self.shown = True
        return show

    def clear(self):
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def run_test(settings, target, direction, reverse, file_path, run_ts, stopper, progress=None,
             rng=random):
    """Run one direction's test of a target with its retries (see attempt_test); write its
    result file; return the document. The file holds the last attempt, with the
    "continuous_iperf" metadata; the log holds every attempt."""
    argv = iperf3_argv(settings.iperf3, target.host, target.port, settings.duration,
                       settings.streams, reverse, settings.extra,
                       server_output=reverse and settings.protocol == "tcp")
    shown = "%s (%s)" % (direction, target.label) if several(settings) else direction
    document, outcome, attempts, started = attempt_test(settings, argv, shown, stopper,
                                                        progress, rng)
    trim_server_output(document)
    document = with_metadata(document, {
        "version": __version__,
        "run": run_ts,
        "prefix": settings.prefix,
        "direction": direction,
        "server": target.host,
        "port": target.port,
        "label": target.label,
        "client": settings.client,
        "protocol": settings.protocol,
        "streams": settings.streams,
        "duration": settings.duration,
        "attempts": attempts,
        "start": round(started, 3),
        "command": command_line(argv),
        "exit_code": outcome.returncode,
        "stderr": one_line(outcome.stderr, 1000),
        "utc_offset": local_utc_offset(started),
    })
    data = encode_result(document)
    try:
        write_atomic(file_path, gzip.compress(data, 6) if file_path.endswith(".gz") else data)
    except OSError as exc:
        # A full disk: the row still goes to the ledger (a line, where the file needed more).
        log.error("cannot write the result file %s: %s", file_path, exc.strerror or exc)
        document["continuous_iperf"]["unsaved"] = exc.strerror or str(exc)
    return document


def attempt_test(settings, argv, direction, stopper, progress, rng):
    """Run one test's attempts; returns the last one's (document, CommandResult, number of
    attempts, start in Unix seconds).

    A busy server is retried after a random pause until --busy-wait seconds have passed (not
    counted as retries); other failures are retried --retries times; a signal ends it all.
    """
    limit = settings.duration + omit_seconds(settings.extra) + settings.timeout_margin
    attempts = failures = 0
    busy_deadline = None
    while True:
        attempts += 1
        started = time.time()
        log.info("%s test, attempt %d", direction, attempts)
        outcome = run_command(argv, limit, env=settings.iperf3_env, stopper=stopper,
                              progress=progress)
        document = result_document(outcome.stdout, outcome.stderr, outcome.returncode,
                                   outcome.timed_out, outcome.stopped_by, outcome.failure)
        if outcome.stderr.strip():
            log.debug("iperf3 stderr: %s", one_line(outcome.stderr, 2000))
        error = document.get("error")
        if error is None:
            log.info("%s test, attempt %d: ok", direction, attempts)
            break
        log.warning("%s test, attempt %d failed: %s", direction, attempts, one_line(error))
        if stopper.signum is not None:
            break
        if _busy(settings, document) and not outcome.timed_out:
            busy_deadline = busy_deadline or time.monotonic() + settings.busy_wait
            if not _pause_for_busy_server(busy_deadline, settings.busy_wait, stopper, rng):
                break
            if stopper.signum is not None:
                document["error"] = "interrupted by %s; %s" % (stopper.name, error)
                break
            continue
        failures += 1
        if failures > settings.retries:
            break
    return document, outcome, attempts, started


def _busy(settings, document):
    """is_busy, asking for the version only when the error may hide "busy" (a fake or hung
    iperf3 must not cost a --version call per attempt)."""
    error = document.get("error", "")
    hidden = any(mark in error for mark in HIDDEN_BUSY_MARKS)
    return is_busy(document, settings.iperf3_version() if hidden else None)


def _pause_for_busy_server(deadline, busy_wait, stopper, rng):
    """Sleep a random while before retrying a busy server; False (and said) once `deadline`
    has passed: give up."""
    now = time.monotonic()
    if now >= deadline:
        log.warning("server still busy after %s s: giving up", busy_wait)
        return False
    delay = min(rng.uniform(*BUSY_DELAY), deadline - now)
    log.info("server busy: retrying in %.1f s", delay)
    stopper.sleep(delay)
    return True


# --- Command line: a run --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (cron mails it; the usage block is noise)."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (program_name(), message))


def _whole_seconds(text):
    if not re.match(r"^\s*\+?\d+\s*$", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(
            "%r is not a whole number of seconds >= 1 (iperf3 would read it as 'forever')" % text)
    return int(text)


def _whole_number(low, high, meaning):
    """An argparse type: a whole number from `low` to `high` (None: no upper bound)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError("%r is not %s" % (text, meaning))
        return value
    return parse


_streams = _whole_number(1, 128, "a number of streams from 1 to 128")


_port = _whole_number(1, 65535, "a port number (1-65535)")


_count = _whole_number(0, None, "a whole number >= 0")


def _real_number(least, meaning, above=False):
    """An argparse type: a finite number from `least` on (above it, with `above`)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")  # fails every comparison below
        if not (value > least if above else value >= least) or value == float("inf"):
            raise argparse.ArgumentTypeError("%r is not %s" % (text, meaning))
        return value
    return parse


_seconds = _real_number(0, "a number of seconds >= 0")


# iperf3 needs a moment after -t to exchange the results; 0 would fail every test.
_margin = _real_number(1, "a number of seconds >= 1")


_mbps = _real_number(0, "a number of Mbit/s >= 0")


def _rate(text):
    """--udp's RATE -> bits/s: a number with an optional K, M or G (x 1000, as iperf3's -b)."""
    match = re.match(r"^(\d+(?:\.\d+)?)([KMGkmg]?)$", text.strip())
    value = float(match.group(1)) * 1000 ** " KMG".index(match.group(2).upper() or " ") if (
        match) else 0
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError("%r is not a rate such as 500K, 50M or 1G" % text)
    return value


def _span_seconds(text):
    """--baseline's SPAN -> seconds: a number and m, h, d or w (90m, 24h, 7d)."""
    span = SPAN_RE.match(text)
    seconds = float(span.group(1)) * SPAN_UNITS[span.group(2)] if span else 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError("%r is not a span such as 90m, 24h or 7d" % text)
    return seconds


_minutes = _real_number(0, "a number of minutes > 0", above=True)


def _loss(text):
    value = _real_number(0, "a percentage from 0 to 100")(text)
    if value > 100:
        raise argparse.ArgumentTypeError("%r is not a percentage from 0 to 100" % text)
    return value


def _percent_pair(text):
    """WARN[,CRIT] percentages -> (warn, crit or None)."""
    parts = text.split(",")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(parts) > 2 or len(values) != len(parts) or not all(
            0 < value < float("inf") for value in values):
        raise argparse.ArgumentTypeError("%r is not WARN[,CRIT], percentages > 0" % text)
    return values[0], values[1] if len(values) == 2 else None


def _report_target(text):
    """report --server: HOST[:PORT] as a Target whose port is None when none is given."""
    try:
        return parse_target(text, None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _prefix(text):
    if not PREFIX_RE.match(text):
        raise argparse.ArgumentTypeError(
            "%r may only contain letters, digits, '.', '_' and '-'" % text)
    return text


def build_parser():
    """The parser of a run's flags; defaults are the settings above."""
    parser = _Parser(
        prog=program_name(),
        usage="%(prog)s [options] [-- IPERF3_ARGS]\n       %(prog)s report [report options]",
        description="Run a forward and a reverse iperf3 test against each server (target) and "
                    "record them all.",
        epilog="Arguments after -- go to iperf3 unchanged (except the options this script sets: "
               "-c -p -t -P -R -J --logfile). 'iperf_client.py report --help' describes the "
               "report. Exit status: 0 ok, 1 a test failed, 2 usage, 73 the ledger could not be "
               "appended to (every test still ran; its files keep it), 75 another run held the "
               "results folder (this run is recorded as skipped), 128+N stopped by signal N.",
    )
    _add_target_flags(parser)
    parser.add_argument("-t", "--duration", type=_whole_seconds, default=TEST_DURATION,
                        metavar="S", help="seconds per test, whole (default: %(default)s)")
    parser.add_argument("-P", "--streams", type=_streams, default=NUMBER_STREAMS, metavar="N",
                        help="parallel streams per test, 1-128 (default: %(default)s)")
    parser.add_argument("-d", "--results-dir", default=RESULTS_DIR, metavar="DIR",
                        help="folder for results, log and ledger (default: %(default)s)")
    parser.add_argument("--prefix", type=_prefix, default=FILES_PREFIX, metavar="TEXT",
                        help="prefix of every file a run writes (default: %(default)r)")
    parser.add_argument("--iperf3", default=IPERF_EXECUTABLE, metavar="PATH",
                        help="iperf3 executable (default: %(default)s)")
    parser.add_argument("--retries", type=_count, default=RETRIES, metavar="N",
                        help="retries of a failed test (default: %(default)s)")
    parser.add_argument("--busy-wait", type=_seconds, default=BUSY_WAIT, metavar="S",
                        help="keep retrying a busy server for S seconds, after random pauses "
                             "(default: %(default)s)")
    parser.add_argument("--jitter", type=_seconds, default=JITTER, metavar="S",
                        help="sleep a random 0..S seconds before the first test "
                             "(default: %(default)s)")
    parser.add_argument("--timeout-margin", type=_margin, default=TIMEOUT_MARGIN, metavar="S",
                        help="an attempt is stopped after duration + omit + S seconds "
                             "(default: %(default)s)")
    _add_schedule_flags(parser)
    _add_output_flags(parser)
    _add_auth_flags(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the iperf3 commands (two per target) and exit; measure "
                             "nothing")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more messages on stderr (-v: each attempt, -vv: each command)")
    parser.add_argument("-q", "--quiet", action="count", default=0,
                        help="print nothing, not even failed tests (the exit code still tells)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def _add_target_flags(parser):
    """What a run tests: the servers, their port, the protocol, and who is testing."""
    parser.add_argument("-c", "--server", action="append", metavar="[LABEL=]HOST[:PORT]",
                        help="iperf3 server to test against; give it again for several (HOST, "
                             "HOST:PORT, [IPv6]:PORT or a bare IPv6 address; default: %s)"
                             % (" ".join(IPERF_SERVER) if isinstance(IPERF_SERVER, (list, tuple))
                                else IPERF_SERVER))
    parser.add_argument("--targets", metavar="FILE",
                        help="read targets from FILE, one a line: HOST[:PORT] [LABEL]; '#' "
                             "starts a comment (default: %s, when no --server is given)"
                             % TARGETS_FILE)
    parser.add_argument("-p", "--port", type=_port, default=IPERF_PORT, metavar="N",
                        help="port of a target that names none (default: %(default)s)")
    parser.add_argument("--udp", type=_rate, default=UDP_RATE, metavar="RATE",
                        help="UDP tests at RATE bits/s in all (K, M, G allowed, e.g. 50M; "
                             "iperf3 -u, and -b RATE/streams for each stream) instead of TCP; "
                             "refused below %d datagrams a test (default: %%(default)s)"
                             % UDP_MIN_DATAGRAMS)
    parser.add_argument("--client-name", default=CLIENT_NAME, metavar="NAME",
                        help="this host's name in results and reports (default: its host name)")


def _add_schedule_flags(parser):
    """How runs share the time between them, and the results folder."""
    parser.add_argument("--interval", type=_margin, default=RUN_INTERVAL, metavar="S",
                        help="seconds between two runs, as cron starts them; a run that cannot "
                             "end within it says so (default: %(default)s)")
    parser.add_argument("--lock-wait", type=_seconds, default=LOCK_WAIT, metavar="S",
                        help="wait up to S seconds for a run holding the results folder, then "
                             "record this run as skipped and exit 75 (default: what --interval "
                             "leaves after this run's own tests and jitter)")


def _add_output_flags(parser):
    """What a run keeps, and where."""
    parser.add_argument("--compress", action="store_true", default=COMPRESS,
                        help="write results as .json.gz, about 10x smaller")
    parser.add_argument("--keep-days", type=_count, default=KEEP_DAYS, metavar="N",
                        help="after a run, delete this prefix's result and log files of runs "
                             "older than N days; ledger rows are kept (default: %(default)s, "
                             "keep forever)")
    parser.add_argument("--prometheus-textfile", default=PROMETHEUS_TEXTFILE, metavar="PATH",
                        help="after each run, write the latest results to PATH in "
                             "node_exporter's textfile-collector format (a *.prom file in its "
                             "--collector.textfile.directory); clients testing other servers or "
                             "ports may share the file")


def _add_auth_flags(parser):
    """A server that requires a login."""
    parser.add_argument("--username", default=USERNAME, metavar="NAME",
                        help="authenticate to the server as NAME (iperf3 3.2+ with OpenSSL); "
                             "the password comes from --password-file or $IPERF3_PASSWORD")
    parser.add_argument("--rsa-public-key-path", default=RSA_PUBLIC_KEY_PATH, metavar="FILE",
                        help="the server's RSA public key (with --username)")
    parser.add_argument("--password-file", default=PASSWORD_FILE, metavar="FILE",
                        help="read the password from the first line of FILE, which only its "
                             "owner may read (default: $IPERF3_PASSWORD)")


def check_options(parser, options):
    """Refuse what argparse's types cannot see; exits 2 with one line. Reads no file (the
    targets file is read by run_settings), runs nothing, changes nothing."""
    name = options.client_name
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        parser.error("argument --client-name: %r holds a control character" % name)
    if options.udp is not None:
        check_udp_rate(parser, options.udp, options.duration)
    owned = owned_option(options.extra)
    if owned is not None:
        parser.error("iperf3 argument %r is set or ruled out by this script: use its own flags "
                     "(-c -p -t -P); it runs -R and -J itself, times tests by --duration and "
                     "measures one direction at a time" % owned[0])
    if options.username is None:
        return
    try:
        check_username(options.username)
        if not options.rsa_public_key_path:
            raise IperfError("--username needs --rsa-public-key-path FILE (the server's key)")
        check_readable(_absolute(options.rsa_public_key_path), "public key")
    except IperfError as exc:
        parser.error(str(exc))


def check_udp_rate(parser, rate, duration):
    """Refuse (exit 2) a --udp rate that sends fewer than UDP_MIN_DATAGRAMS datagrams a test:
    the loss and jitter of a handful of packets say nothing about a link."""
    datagrams = rate * duration / 8.0 / UDP_DATAGRAM
    if datagrams < UDP_MIN_DATAGRAMS:
        least = math.ceil(UDP_MIN_DATAGRAMS * UDP_DATAGRAM * 8.0 / duration / 1000.0)
        parser.error("argument --udp: %s bits/s for %d s sends about %s datagrams of %d bytes: "
                     "too few for loss and jitter to mean anything; give at least %dK (%d "
                     "datagrams a test) or a longer --duration" % (
                         plain_number(rate), duration, plain_number(round(datagrams, 1)),
                         UDP_DATAGRAM, least, UDP_MIN_DATAGRAMS))


def resolve_targets(options):
    """The run's targets, labelled: --server (each time it is given) and --targets FILE; with
    neither on the command line, TARGETS_FILE, else IPERF_SERVER. Raises ValueError."""
    texts, files = options.server or [], [options.targets] if options.targets else []
    if not texts and not files:
        files = [TARGETS_FILE] if TARGETS_FILE else []
    if not texts and not files:
        texts = IPERF_SERVER.split() if isinstance(IPERF_SERVER, str) else list(IPERF_SERVER)
    targets = []
    for text in texts:
        try:
            targets.append(parse_target(text, options.port))
        except ValueError as exc:
            raise ValueError("argument -c/--server: %s" % exc)
    for path in files:
        try:
            lines = read_targets_file(_absolute(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError("cannot read the targets file %s: %s" % (
                path, getattr(exc, "strerror", None) or exc))
        targets += parse_targets_file(lines, options.port, path)
    if not targets or any(target.host == PLACEHOLDER_SERVER for target in targets):
        raise ValueError("no server configured: give --server HOST or --targets FILE (or set "
                         "IPERF_SERVER in the script)")
    return labelled_targets(targets, options.port)


def read_targets_file(path):
    """A targets file's lines. Only a regular file of at most TARGETS_FILE_LIMIT bytes is read
    (a FIFO would hang a cron run, /dev/zero fill its memory); a byte order mark is skipped.
    Raises OSError, UnicodeDecodeError."""
    with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) \
            as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = handle.read(TARGETS_FILE_LIMIT + 1)
    if len(data) > TARGETS_FILE_LIMIT:
        raise OSError(errno.EFBIG, "larger than %d bytes" % TARGETS_FILE_LIMIT)
    return data.decode("utf-8-sig").splitlines(keepends=True)


def check_username(username):
    if not username or any(c == "," or c.isspace() for c in username):
        raise IperfError("argument --username: %r is not a user name (no commas or "
                         "whitespace)" % username)


def check_readable(path, what):
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise IperfError("cannot read %s %s: %s" % (what, path, exc.strerror))


def check_credential_lengths(settings):
    """Raise IperfError where the run's iperf3 refuses its credentials' length: 3.7 and older
    take at most 20 characters of each (a parameter error at every test). An effect of the run,
    not of the validators: runs `iperf3 --version`, only when a credential is that long."""
    if settings.username is None:
        return
    username, password = settings.username, settings.iperf3_env[PASSWORD_VARIABLE]
    longest = max(len(username), len(password))
    if longest <= CREDENTIAL_LIMIT:
        return
    version = settings.iperf3_version()
    if version is not None and version < CREDENTIAL_LIMIT_UNTIL:
        raise IperfError("iperf3 %s takes user names and passwords of at most %d characters; "
                         "this %s has %d" % (_version_text(version), CREDENTIAL_LIMIT,
                                             "user name" if len(username) == longest
                                             else "password", longest))


def run_settings(options, environ):
    """The RunSettings of checked flags (see check_options): the targets (the targets file is
    read here), paths made absolute, and with a user name, the login's iperf3 arguments and
    the environment that carries its password (read here). Runs nothing. Raises IperfError
    (exit 2) for targets or a password that cannot be had."""
    try:
        targets = resolve_targets(options)
    except ValueError as exc:
        raise IperfError(str(exc), 2)
    extra, env = list(options.extra), None
    if options.username is not None:
        password = read_password(options.password_file, environ)
        extra = auth_argv(options.username, _absolute(options.rsa_public_key_path)) + extra
        env = dict(environ, **{PASSWORD_VARIABLE: password})
    udp = options.udp or any(arg == "--udp" or "u" in short_flags(arg) for arg in extra)
    if options.udp:
        # iperf3's -b is each stream's rate: --udp is the test's, shared out over them.
        extra = ["-u", "-b", "%d" % max(1, round(options.udp / options.streams))] + extra
    return RunSettings(
        iperf3=options.iperf3, targets=targets, iperf3_version=Iperf3Version(options.iperf3),
        client=options.client_name or socket.gethostname(),
        protocol="udp" if udp else "tcp", interval=options.interval,
        lock_wait=options.lock_wait, duration=options.duration, streams=options.streams,
        extra=extra, iperf3_env=env, username=options.username,
        results_dir=_absolute(options.results_dir), prefix=options.prefix,
        retries=options.retries, busy_wait=options.busy_wait, jitter=options.jitter,
        timeout_margin=options.timeout_margin, compress=options.compress,
        keep_days=options.keep_days, prometheus_textfile=_absolute(options.prometheus_textfile)
        if options.prometheus_textfile else "", quiet=options.quiet)


def _absolute(path):
    return os.path.abspath(os.path.expanduser(path))


class StderrFormatter(logging.Formatter):
    """A log record as a line on stderr in say_error's and say_warning's format: "<program>:
    error: ..." (and "warning: ..."), as argparse's own; progress (-v) after the name alone."""

    def format(self, record):
        kind = ("error: " if record.levelno >= logging.ERROR else
                "warning: " if record.levelno >= logging.WARNING else "")
        return "%s: %s%s" % (program_name(), kind, record.getMessage())


def _print_commands(settings):
    """--dry-run: each target's two iperf3 commands, one a line."""
    try:
        for target in settings.targets:
            for _, _, flags in DIRECTIONS:
                print(command_line(iperf3_argv(
                    settings.iperf3, target.host, target.port, settings.duration,
                    settings.streams, bool(flags), settings.extra,
                    server_output=bool(flags) and settings.protocol == "tcp")))
        sys.stdout.flush()
    except BrokenPipeError:  # `--dry-run | head`: the reader has what it wanted
        _silence_stdout()
    return 0


def stderr_handler(options):
    """The run's handler for stderr (see logging_to): only what a person must act on (a failed
    test, a skipped run) by default, so cron mails nothing for a good run; -v adds progress of
    the run, -vv every command, -q silences even failures (the exit code and the files still
    tell)."""
    if options.quiet:
        level = logging.CRITICAL + 10
    else:
        level = (logging.ERROR, logging.INFO, logging.DEBUG)[min(options.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StderrFormatter())
    handler.setLevel(level)
    return handler


# --- Command line: report -------------------------------------------------------------------------

class _CheckParser(_Parser):
    """The report's parser under --check: wrong arguments are the plugin state UNKNOWN (exit 3),
    on stdout, where Nagios and Icinga read a plugin's status line."""

    def error(self, message):
        sys.stdout.write("UNKNOWN - bad arguments: %s\n" % message)
        sys.stdout.flush()
        raise SystemExit(CHECK_EXIT["UNKNOWN"])


def build_report_parser(parser_class=_Parser):
    """The parser of the `report` subcommand."""
    parser = parser_class(
        prog=program_name() + " report",
        description="Summarise the results folder's ledger: counts, failures, throughput "
                    "(received bits/s) per direction, the median by hour of day, the lowest "
                    "and the failed runs.",
        epilog="WHEN is an ISO date or date-time (local time without an offset) or a span back "
               "from now: 90m, 24h, 7d, 2w. Exit status: 0 a report (also 'no results'), 1 the "
               "folder or ledger cannot be read, 2 usage.",
    )
    parser.add_argument("-d", "--results-dir", action="append", metavar="DIR",
                        help="results folder; give it again to report on several as one set "
                             "of links, e.g. folders collected from several client hosts "
                             "(default: %s)" % RESULTS_DIR)
    parser.add_argument("--prefix", type=_prefix, default=None, metavar="TEXT",
                        help="only this prefix's runs (default: every prefix)")
    parser.add_argument("--server", type=_report_target, metavar="HOST[:PORT]",
                        help="only the tests of this target (any port when none is given)")
    parser.add_argument("--client", metavar="NAME",
                        help="only the tests run by this client host (its --client-name)")
    parser.add_argument("--protocol", choices=("tcp", "udp"),
                        help="only TCP or only UDP tests (default: both, as separate links)")
    parser.add_argument("--since", metavar="WHEN", help="only tests started at or after WHEN")
    parser.add_argument("--until", metavar="WHEN", help="only tests started before WHEN")
    parser.add_argument("--direction", choices=("forward", "reverse", "both"),
                        default=REPORT_DIRECTION,
                        help="which tests (default: %(default)s)")
    parser.add_argument("--format", choices=("text", "csv", "json"), default=REPORT_FORMAT,
                        help="text for a person, csv (the selected ledger rows) or json "
                             "(each link's summary; its rows with --runs) (default: "
                             "%(default)s)")
    parser.add_argument("--runs", action="store_true",
                        help="with --format json, also give every selected ledger row, as "
                             "\"runs\" before \"links\" (streamed: a year of rows is large)")
    parser.add_argument("--rebuild", action="store_true",
                        help="first regenerate the ledger from the result files (the remedy "
                             "for a missing or damaged ledger)")
    parser.add_argument("--html", metavar="FILE",
                        help="write the report as one self-contained HTML page (charts, "
                             "summary, failed runs) to FILE, atomically, instead of printing it")
    parser.add_argument("--no-cache", dest="cache", action="store_false", default=REPORT_CACHE,
                        help="read every ledger whole, neither using nor writing the report "
                             "cache (%s in the results folder; checked against the ledger "
                             "before it is used)" % REPORT_CACHE_DIR)
    _add_check_flags(parser)
    return parser


def _add_check_flags(parser):
    """report --check: a Nagios/Icinga plugin, against fixed limits or the link's own normal."""
    check = parser.add_argument_group(
        "monitoring check", "--check is a Nagios/Icinga plugin: one status line with performance "
        "data for the latest test of each direction; exit 0 OK, 1 WARNING, 2 CRITICAL, "
        "3 UNKNOWN (no results, a direction without results, wrong arguments)")
    check.add_argument("--check", action="store_true",
                       help="check the latest tests instead of reporting")
    check.add_argument("--warn-below", type=_mbps, metavar="MBPS",
                       help="WARNING when a latest TCP test received less (Mbit/s, fractions "
                            "allowed)")
    check.add_argument("--crit-below", type=_mbps, metavar="MBPS",
                       help="CRITICAL when a latest TCP test received less (Mbit/s; a failed "
                            "test is always CRITICAL)")
    check.add_argument("--warn-loss", type=_loss, metavar="PCT",
                       help="WARNING when a latest UDP test lost more than PCT %% of its packets")
    check.add_argument("--crit-loss", type=_loss, metavar="PCT",
                       help="CRITICAL when a latest UDP test lost more than PCT %%")
    check.add_argument("--drop-below", type=_percent_pair, metavar="WARN[,CRIT]",
                       help="against the link's own normal: WARNING (CRITICAL) when the median "
                            "received of the latest --recent tests is below WARN (CRIT) %% of the "
                            "median of the --baseline before them, e.g. 80,60")
    check.add_argument("--rtt-rise", type=_percent_pair, metavar="WARN[,CRIT]",
                       help="likewise, when the median RTT under load rises more than WARN "
                            "(CRIT) %% above its baseline, e.g. 50,100")
    check.add_argument("--recent", type=_whole_number(1, None, "a number of tests >= 1"),
                       default=RECENT_TESTS, metavar="N",
                       help="the latest tests compared with the baseline (default: %(default)s)")
    check.add_argument("--baseline", type=_span_seconds, default=BASELINE_SPAN, metavar="SPAN",
                       help="the span before the latest tests that is the link's normal: 90m, "
                            "24h, 7d (default: %(default)s)")
    check.add_argument("--consecutive", type=_whole_number(1, None, "a number of tests >= 1"),
                       default=CONSECUTIVE_TESTS, metavar="N",
                       help="raise a relative WARNING or CRITICAL only when each of the latest N "
                            "tests is beyond the bound too (default: %(default)s)")
    check.add_argument("--max-age", type=_minutes, metavar="MINUTES",
                       help="CRITICAL when a direction's latest test started longer ago "
                            "(default: %d x the usual interval between runs in the ledger, or "
                            "%s minutes while it holds fewer than three runs)"
                            % (MAX_AGE_RUNS, plain_number(MAX_AGE_FALLBACK)))


def _check_report_options(parser, options):
    """Refuse what argparse cannot see in the report's flags (under --check: UNKNOWN, exit 3)."""
    pairs = (("--warn-below", "--crit-below", options.warn_below, options.crit_below),
             ("--warn-loss", "--crit-loss", options.warn_loss, options.crit_loss))
    given = [value is not None for _, _, low, high in pairs for value in (low, high)]
    if options.check:
        for warn, crit, warn_value, crit_value in pairs:
            if (warn_value is None) != (crit_value is None):
                parser.error("%s and %s go together" % (warn, crit))
        if not any(given) and options.drop_below is None and options.rtt_rise is None:
            parser.error("--check needs thresholds: --warn-below MBPS and --crit-below MBPS, "
                         "--warn-loss PCT and --crit-loss PCT, or --drop-below / --rtt-rise")
        if options.warn_below is not None and options.warn_below < options.crit_below:
            parser.error("--warn-below %s is below --crit-below %s: warn must be above crit" % (
                plain_number(options.warn_below), plain_number(options.crit_below)))
        if options.warn_loss is not None and options.warn_loss > options.crit_loss:
            parser.error("--warn-loss %s is above --crit-loss %s: warn must be below crit" % (
                plain_number(options.warn_loss), plain_number(options.crit_loss)))
        for flag, pair, lower in (("--drop-below", options.drop_below, True),
                                  ("--rtt-rise", options.rtt_rise, False)):
            if pair is not None and pair[1] is not None and (pair[1] >= pair[0]) == lower:
                parser.error("%s %s,%s: the CRIT bound must be %s than the WARN one" % (
                    flag, plain_number(pair[0]), plain_number(pair[1]),
                    "lower" if lower else "higher"))
        if options.html or options.rebuild:
            parser.error("--check does not go with --html or --rebuild")
    elif any(given) or options.max_age is not None or (options.drop_below, options.rtt_rise) != (
            None, None):
        parser.error("--warn-below, --crit-below, --warn-loss, --crit-loss, --drop-below, "
                     "--rtt-rise and --max-age go with --check")


def report_main(argv):
    """`iperf_client.py report ...`: returns 0 (a report), 1 (unreadable folder or ledger), 2."""
    # argparse also takes an abbreviation such as --che; only --check starts with --ch.
    check = any(arg.startswith("--ch") and "--check".startswith(arg) for arg in argv)
    parser = build_report_parser(_CheckParser if check else _Parser)
    now = time.time()
    try:
        options = parser.parse_args(argv)
        _check_report_options(parser, options)
        try:
            since = parse_when(options.since, now) if options.since is not None else None
            until = parse_when(options.until, now) if options.until is not None else None
        except ValueError as exc:
            parser.error(str(exc))
        if since is not None and until is not None and since >= until:
            parser.error("--since %s is not before --until %s: the period is empty" % (
                options.since, options.until))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    folders = distinct_folders(options.results_dir or [RESULTS_DIR])
    # The report's pass makes millions of short-lived lists and keeps few objects (its figures
    # are arrays): the cyclic garbage collector would walk the kept ones again and again.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if options.check:
            return check_main(options, folders, since, until, now)
        return _report(options, folders, since, until, now)
    except BrokenPipeError:  # `report | head`: the reader has what it wanted
        _silence_stdout()
        return 0
    except KeyboardInterrupt:  # Ctrl-C while waiting for the lock or reading a huge folder
        say("interrupted")
        return 128 + signal.SIGINT
    except Terminated:  # the rebuild's workers are gone with the pool; its temp file removed
        say("stopped by SIGTERM")
        return 128 + signal.SIGTERM
    except IperfError as exc:
        say("error: %s" % exc)
        return exc.status
    except OSError as exc:
        say("error: %s" % exc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if gc_was_enabled:
            gc.enable()


def distinct_folders(texts):
    """The results folders given on the command line, absolute, each once: `A`, `A/` and a
    symbolic link to A are one folder, whose every test would else count twice (a repeat is
    said on stderr)."""
    folders, seen = [], {}
    for text in texts:
        folder = os.path.abspath(os.path.expanduser(text))
        real = os.path.realpath(folder)
        if real in seen:
            say("warning: %s is the results folder %s, given already: it is read once" % (
                text, seen[real]))
            continue
        seen[real] = folder
        folders.append(folder)
    return folders


def tally_folders(folders, selection, emit=None, cached=False):
    """One pass over the ledgers of the results folders: the ReportTally of the selected rows
    (`cached`: helped by each folder's report cache, see tally_folder). A folder is one
    client's: rows written before version 2.2 (no client) take the latest client name of
    their ledger, else, with several folders, the folder's base name. Two folders naming the
    same client are said once on stderr. Raises IperfError."""
    tally = None
    for folder in folders:
        ledger = os.path.join(folder, LEDGER_NAME)
        if not os.path.isdir(folder):
            raise IperfError("cannot read results folder %s: no such folder" % folder)
        if not os.path.exists(ledger) and not any(map(RESULT_NAME_RE.match, os.listdir(folder))):
            continue  # a folder where no test ran yet: a report that says so
        fallback = latest_client(ledger) if os.path.exists(ledger) else ""
        fallback = fallback or (os.path.basename(folder) if len(folders) > 1 else "")
        part = tally_folder(folder, selection, fallback, emit, cached)
        part.end_folder()
        if tally is None:
            tally = part
        else:
            absorb_tally(tally, part)
    tally = tally or ReportTally(selection, emit)
    seen, shared = {}, set()
    for folder, clients in tally.clients.items():
        for client in clients:
            if seen.setdefault(client, folder) != folder:
                shared.add(client)
    if shared:
        say("warning: the client name%s %s appear%s in more than one folder: their tests are "
            "taken as one host's (give each host its own --client-name)" % (
                "s" if len(shared) > 1 else "", ", ".join(sorted(shared)),
                "" if len(shared) > 1 else "s"))
    return tally


def _report(options, folders, since, until, now):
    """The report proper (after a --rebuild when asked): text, csv, json or a page, from one
    pass over the ledgers."""
    for folder in folders:
        if not os.path.isdir(folder):
            raise IperfError("cannot read results folder %s: no such folder" % folder)
    if options.rebuild:
        for folder in folders:
            lock_fd = take_lock(folder)
            try:
                with ledger_lock(folder):  # a skipped run's rows wait for it
                    count = rebuild_ledger(folder)
            finally:
                os.close(lock_fd)
            say("rebuilt %s: %d rows" % (os.path.join(folder, LEDGER_NAME), count))
    selection = Selection(options.prefix, since, until, directions_of(options.direction),
                          options.client, options.server, options.protocol)
    out, folder = sys.stdout, ", ".join(folders)
    if options.format == "csv" and not options.html:
        _write_csv(out, folders, selection)
        return 0
    runs = RunsWriter(out) if options.format == "json" and options.runs and not options.html \
        else None
    # A span back from now (--since 7d) selects other rows at every report: no cache fits it.
    cached = options.cache and not any(SPAN_RE.match(text or "") for text in (
        options.since, options.until))
    tally = tally_folders(folders, selection, runs.write if runs else None, cached)
    links = tally.sorted_links()
    overview = link_overview(links, names_of(links), options.direction, now)
    if options.html:
        page = html_report(tally, links, overview, folder, options.prefix, since, until, now)
        _write_html(options.html, page)
    elif options.format == "json":
        if runs:
            runs.close()
        out.write('%s"links": %s}\n' % ("" if runs else "{", json.dumps(overview)))
    else:
        # A ledger cell may hold control characters (a hand edit, a hostile error text): they
        # must not reach the operator's terminal as escape sequences.
        out.write(printable("\n".join(text_report(tally, links, overview, folder,
                                                  options.prefix, since, until, now))) + "\n")
    out.flush()
    return 0


def _write_csv(out, folders, selection):
    """--format csv: the selected ledger rows, with the header, as they are read (their client
    filled in when several folders are read as one set of links)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LEDGER_COLUMNS)
    several = len(folders) > 1

    def emit(row, key):
        if several and (row[Col.CLIENT] != key[0] or row[Col.PROTOCOL] != key[3]):
            row = list(row)
            row[Col.CLIENT], row[Col.PROTOCOL] = key[0], key[3]
        writer.writerow(row)
    tally_folders(folders, selection, emit)
    out.flush()


class RunsWriter:
    """report --format json --runs: each selected row written as it is read (a JSON object,
    its client and protocol filled in), so that a year of rows never sits in memory."""

    def __init__(self, out):
        self.out, self.buffer, self.first = out, [], True
        out.write('{"runs": [')

    def write(self, row, key):
        if row[Col.CLIENT] != key[0] or row[Col.PROTOCOL] != key[3]:
            row = list(row)
            row[Col.CLIENT], row[Col.PROTOCOL] = key[0], key[3]
        self.buffer.append(run_json(row))
        if len(self.buffer) >= 2000:
            self.flush()

    def flush(self):
        if self.buffer:
            self.out.write(("\n" if self.first else ",\n") + ",\n".join(self.buffer))
            self.first, self.buffer = False, []

    def close(self):
        self.flush()
        self.out.write("\n],\n")


def _write_html(path, page):
    path = os.path.abspath(os.path.expanduser(path))
    try:
        write_atomic(path, page.encode("utf-8"))
    except OSError as exc:
        raise IperfError("cannot write %s: %s" % (path, exc.strerror or exc))


def merge_folders(folders, read):
    """The rows of several results folders (`read(folder)` gives each one's), with their
    clients filled in (fill_clients). A folder is one client's; two folders naming the same
    client (two hosts left with one --client-name) are said once on stderr, and their rows put
    in time order, since the latest test of a link is then no longer the last one read."""
    if len(folders) == 1:
        return fill_clients(read(folders[0]))
    rows, seen, shared = [], {}, set()
    for folder in folders:
        part = fill_clients(read(folder), os.path.basename(folder))
        for client in {row[Col.CLIENT] for row in part[-INTERVAL_ROWS:]}:
            if seen.setdefault(client, folder) != folder:
                shared.add(client)
        rows += part
    if shared:
        say("warning: the client name%s %s appear%s in more than one folder: their tests are "
            "taken as one host's (give each host its own --client-name)" % (
                "s" if len(shared) > 1 else "", ", ".join(sorted(shared)),
                "" if len(shared) > 1 else "s"))
        rows.sort(key=lambda row: row_time(row[Col.TIMESTAMP]) or 0.0)
    return rows


def _ledger_rows(folder):
    """The ledger's rows; none for a folder where no test ran yet. Raises IperfError."""
    if not os.path.isdir(folder):
        raise IperfError("cannot read results folder %s: no such folder" % folder)
    ledger = os.path.join(folder, LEDGER_NAME)
    if not os.path.exists(ledger) and not any(map(RESULT_NAME_RE.match, os.listdir(folder))):
        return []  # a folder where no test ran yet: a report that says so
    return read_ledger(ledger)


def check_main(options, folders, since, until, now):
    """`report --check`: print the status line, return the plugin's exit code."""
    try:
        rows = merge_folders(folders,
                             lambda folder: _latest_rows(folder, options, since, until, now))
        rows = select_link(rows, options.client, options.server, options.protocol)
    except (IperfError, OSError) as exc:
        state, line = "UNKNOWN", "UNKNOWN - %s" % one_line(exc)
    else:
        if not rows:
            state, line = "UNKNOWN", "UNKNOWN - no results in %s%s" % (
                ", ".join(folders), " for prefix %r" % options.prefix
                if options.prefix is not None else "")
        else:
            state, line = _check_rows(options, rows, now)
    sys.stdout.write(printable(line) + "\n")
    sys.stdout.flush()
    return CHECK_EXIT[state]


def _check_rows(options, rows, now):
    links = group_links(rows)
    mbps = (lambda value: None if value is None else value * 1e6)
    limits = CheckLimits(
        warn_bps=mbps(options.warn_below), crit_bps=mbps(options.crit_below),
        warn_loss=options.warn_loss, crit_loss=options.crit_loss, drop=options.drop_below,
        rise=options.rtt_rise, recent=options.recent, baseline=options.baseline,
        consecutive=options.consecutive,
        max_age=options.max_age)  # None: each link's own usual interval (judge_link)
    directions = directions_of(options.direction)
    if len(links) > 1:
        state, line = check_links(links, link_names(links), directions, limits, now)
    else:
        state, line = check_result(rows, directions, limits, now)
    unjudged = thresholds_unjudged({key[3] for key in links}, limits)
    if unjudged:  # failed and stale tests are still judged: a CRITICAL stays CRITICAL
        state = max(state, "UNKNOWN", key=CHECK_RANK.index)
        line = "%s - %s; %s" % (state, unjudged, line.split(" - ", 1)[1])
    return state, line


def thresholds_unjudged(protocols, limits):
    """None, or what to say when no selected link has the figures the thresholds given judge
    (a UDP-only folder checked by throughput or RTT, a TCP-only one by loss): the check would
    else say OK having judged nothing."""
    tcp = any(value is not None for value in (limits.warn_bps, limits.crit_bps, limits.drop,
                                              limits.rise))
    udp = limits.warn_loss is not None or limits.crit_loss is not None
    if "tcp" not in protocols and not udp:
        return ("no TCP link: --warn-below/--crit-below, --drop-below and --rtt-rise judge "
                "none of these UDP links (give --warn-loss and --crit-loss)")
    if "udp" not in protocols and not tcp:
        return ("no UDP link: --warn-loss/--crit-loss judge none of these TCP links (give "
                "--warn-below and --crit-below, or --drop-below)")
    return None


def _latest_rows(folder, options, since, until, now):
    """The selected rows among the ledger's latest: enough for the latest test of each link
    and direction seen there, and the usual interval (INTERVAL_ROWS), read from the ledger's
    end only, reading further back only when the selection finds too little there. A link
    whose last test is more than CHECK_REACH older than the selection's latest (a target since
    removed) is left out, however many rows were read. Raises IperfError, OSError."""
    ledger = os.path.join(folder, LEDGER_NAME)
    if not os.path.exists(ledger):
        return _ledger_rows(folder)  # none yet, or a missing ledger said as report says it
    wanted = INTERVAL_ROWS
    directions = set(directions_of(options.direction))
    # Back a day at least, so that a link tested then but no more is judged (stale), not
    # forgotten; with --drop-below or --rtt-rise, back to the baseline's start and a day.
    relative = options.drop_below is not None or options.rtt_rise is not None
    back = CHECK_REACH + (options.baseline if relative else 0)
    while True:
        tail, whole = read_ledger_tail(ledger, wanted)
        rows = select_link(select_rows(tail, options.prefix, since, until, options.direction),
                           None, options.server)
        found = collections.defaultdict(set)
        for row in rows:
            found[_LINK_KEY(row)].add(row[Col.DIRECTION])
        oldest = row_time(tail[0][Col.TIMESTAMP]) if tail else None
        if whole or (len(rows) >= INTERVAL_ROWS and found and all(
                seen >= directions for seen in found.values()) and (
                oldest is not None and oldest <= latest_moment(tail, now) - back)):
            # The day runs back from the selection's latest test, not from now: a client
            # whose runs all stopped (or the one link --server names) stays judged, stale.
            return links_within(rows, latest_moment(rows, now) - CHECK_REACH)
        wanted *= 4


def latest_moment(rows, now):
    """The latest test's start among `rows` (Unix seconds), but never later than `now`: a test
    dated in the future (a clock off) must not push every other link out of the check."""
    moments = [moment for moment in map(row_time, (row[Col.TIMESTAMP] for row in rows))
               if moment is not None]
    return min(max(moments), now) if moments else now


def links_within(rows, reach):
    """The rows of the links whose last row (a test or a skipped run) started at `reach` or
    later: the links --check judges. A link last tested before then was taken out of the
    schedule; the check forgets it after CHECK_REACH."""
    last = {}
    for row in rows:
        moment = row_time(row[Col.TIMESTAMP])
        key = _LINK_KEY(row)
        if moment is not None and moment > last.get(key, float("-inf")):
            last[key] = moment
    kept = {key for key, moment in last.items() if moment >= reach}
    return [row for row in rows if _LINK_KEY(row) in kept]


def _raise_terminated(signum, frame):
    raise Terminated()


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    """Entry point: parse `argv` (default sys.argv[1:]), run, return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    parser = build_parser()
    ours, extra = split_extra(argv)
    try:
        options = parser.parse_args(ours)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    options.extra = extra
    try:
        check_options(parser, options)
        try:
            settings = run_settings(options, os.environ)
            check_credential_lengths(settings)
        except IperfError as exc:
            parser.error(str(exc))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if options.dry_run:
        return _print_commands(settings)
    log.setLevel(logging.DEBUG)  # the handlers choose what each shows
    log.propagate = False
    stopper = Stopper()
    stopper.install()
    try:
        with logging_to(stderr_handler(options)):
            return run_with_exit_code(settings, stopper)
    finally:
        stopper.restore()


def run_with_exit_code(settings, stopper):
    """run(), its expected failures logged (one line on stderr): returns the exit code."""
    try:
        return run(settings, stopper)
    except IperfError as exc:
        log.error("%s", exc)
        return exc.status
    except OSError as exc:
        log.error("%s%s", "cannot write %s: " % exc.filename if exc.filename else "",
                  exc.strerror or exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
