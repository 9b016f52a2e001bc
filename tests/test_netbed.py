"""The network test bed (issue 7): the scripts on a real, emulated link between two hosts.

Two hosts live in network namespaces with addresses from 198.18.0.0/15 (see netbed.py); the
link between them is shaped per direction. First the bed itself is checked: UDP pings see the
delay, jitter and loss asked for; plain iperf3 measures the shaped rates, sees loss as
retransmits and works over a 50 ms round trip; teardown leaves nothing. Then the scripts run on it
as in production: iperf_server.py on the server host, iperf_client.py (and its report) on the
client host.

Needs root, iproute2 and /dev/net/tun: otherwise these tests skip, or fail under
REQUIRE_NETNS=1 (CI).
"""

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

import iperf_server
import netbed
from conftest import (CLIENT_SCRIPT, SERVER_SCRIPT, assert_quiet_success, kill_pid, require,
                      says)
from netbed import SERVER_ADDR, NetBed, Shape

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FWD_MBIT = 50
REV_MBIT = 20


def mbit(bps):
    return bps / 1e6


@pytest.fixture
def make_bed(iperf3):
    """Factory: `make_bed(forward=Shape(...), reverse=Shape(...))` builds a bed; all of them are
    torn down afterwards, whatever the test did."""
    ok, why = netbed.available()
    require(ok, "network namespaces (%s)" % why, "REQUIRE_NETNS")
    beds = []

    def make(forward=None, reverse=None):
        try:
            bed = NetBed.create(forward, reverse)
        except RuntimeError as exc:
            require(False, "network namespaces (%s)" % exc, "REQUIRE_NETNS")
        beds.append(bed)
        return bed

    try:
        yield make
    finally:
        for bed in beds:
            bed.destroy()


@pytest.fixture
def bed(make_bed):
    """A bed shaped to 50 Mbit/s forward and 20 Mbit/s reverse, no delay, no loss."""
    return make_bed(Shape(FWD_MBIT), Shape(REV_MBIT))


# --- the bed itself, checked with plain iperf3 ---

def test_plain_iperf3_measures_the_shaped_rate_each_way(bed):
    forward = bed.raw_iperf3(["-t", "2"])
    reverse = bed.raw_iperf3(["-t", "2", "-R"])
    for result, rate in ((forward, FWD_MBIT), (reverse, REV_MBIT)):
        assert "error" not in result
        received = mbit(result["end"]["sum_received"]["bits_per_second"])
        # The receiver's goodput is TCP payload: 1448 of each 1500 bytes the shaper counts
        # (96.5 %); measured here 48.3 of 50 and 19.3 of 20.
        assert rate * 0.85 < received <= rate * 1.02, (rate, received)
    assert forward["start"]["test_start"]["reverse"] == 0
    assert reverse["start"]["test_start"]["reverse"] == 1


def test_plain_iperf3_sees_loss_as_retransmits(make_bed):
    bed = make_bed(Shape(FWD_MBIT, loss_pct=2), Shape(REV_MBIT))
    result = bed.raw_iperf3(["-t", "2"])
    assert "error" not in result
    sent = result["end"]["sum_sent"]
    packets = sent["bytes"] / 1448.0
    # About 2 % of the packets are dropped by the wire and have to be sent again.
    assert sent["retransmits"] > packets * 0.01, (sent["retransmits"], packets)


def test_plain_iperf3_over_a_50ms_round_trip(make_bed):
    bed = make_bed(Shape(FWD_MBIT, delay_ms=25), Shape(REV_MBIT, delay_ms=25))
    result = bed.raw_iperf3(["-t", "2"])
    assert "error" not in result
    rtt_ms = result["end"]["streams"][0]["sender"]["mean_rtt"] / 1000.0
    assert 50 <= rtt_ms < 150, rtt_ms
    # Slow start over 50 ms costs part of a 2 s test: measured about 43 of 50.
    assert FWD_MBIT * 0.6 < mbit(result["end"]["sum_received"]["bits_per_second"]) <= FWD_MBIT


UDP_ECHO = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 9000))
print("ready", flush=True)
while True:
    data, peer = sock.recvfrom(64)
    sock.sendto(data, peer)
"""

UDP_PINGS = """
import json, socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(0.005)
sent, rtts, deadline = {}, [], None
for seq in range(int(sys.argv[2])):
    sent[seq] = time.monotonic()
    sock.sendto(str(seq).encode(), (sys.argv[1], 9000))
    end = time.monotonic() + 0.005
    while time.monotonic() < end or (seq == int(sys.argv[2]) - 1 and time.monotonic() < end + 1):
        try:
            data = sock.recv(64)
        except socket.timeout:
            continue
        rtts.append((time.monotonic() - sent[int(data)]) * 1000)
print(json.dumps(rtts))
"""


def test_wire_delays_jitters_and_loses_as_asked(make_bed):
    """UDP pings (every 5 ms) across the wire: 20 ms each way, 5 ms jitter on the way out, 10 %
    loss on the way back."""
    bed = make_bed(Shape(delay_ms=20, jitter_ms=5), Shape(delay_ms=20, loss_pct=10))
    # The instruments at the wire's real-time priority: what they measure is the wire, not how
    # soon a loaded machine schedules them.
    rt = ["chrt", "--rr", str(netbed.WIRE_PRIORITY)]
    echo = bed.popen_in(bed.server_ns, rt + [sys.executable, "-c", UDP_ECHO, SERVER_ADDR])
    assert echo.stdout.readline().strip() == "ready"
    count = 300
    done = bed.exec_in(bed.client_ns, rt + [sys.executable, "-c", UDP_PINGS, SERVER_ADDR, count])
    rtts = sorted(json.loads(done.stdout))
    # 10 % of 300 answers lost: about 270 (binomial spread about 5); measured 267-276.
    assert count * 0.8 < len(rtts) < count * 0.97, len(rtts)
    # 40 ms +- 5 ms: measured 35.2 to 45.3, median 40.0-40.4 (40.2 to 40.8 without jitter). The
    # upper bound is read at the 95th percentile: on a loaded machine a few pings in 270 were
    # seen 7 ms late (52 ms) from scheduling alone (the kernel's network work for the tests
    # beside it comes before any process, real-time or not), which says nothing of the wire.
    upper = rtts[int(len(rtts) * 0.95)]
    assert 34.5 <= rtts[0] and upper < 50, (rtts[0], upper, rtts[-1])
    assert 38 < statistics.median(rtts) < 43, statistics.median(rtts)
    # The jitter shows as spread (measured 7.5-8 ms from the 10th to the 90th percentile).
    assert rtts[int(len(rtts) * 0.9)] - rtts[int(len(rtts) * 0.1)] > 4


def test_teardown_leaves_nothing_and_leftovers_are_cleaned(make_bed):
    bed = make_bed()
    # A daemon (it forks away from us) and a plain background process, as tests leave them.
    bed.exec_in(bed.server_ns, ["iperf3", "-s", "-D", "-B", SERVER_ADDR, "-p", "5201"])
    bed.popen_in(bed.client_ns, ["sleep", "300"])
    # Both running (`ip netns exec` may take a while to start `sleep` on a loaded machine).
    assert netbed.wait_for(lambda: len(netbed.netns_pids(bed.server_ns)) == 1
                           and len(netbed.netns_pids(bed.client_ns)) == 1)
    pids = netbed.netns_pids(bed.server_ns) + netbed.netns_pids(bed.client_ns)
    assert len(pids) == 2
    bed.destroy()
    assert not any(netbed.pid_alive(pid) for pid in pids)
    names = netbed.list_netns()
    assert bed.client_ns not in names and bed.server_ns not in names

    # A namespace left by a killed run (its owner pid is gone) goes at the next bed's start;
    # one that belongs to a live run does not.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = "%s%d-1c" % (netbed.PREFIX, dead.pid)
    live = "%s%d-999c" % (netbed.PREFIX, os.getppid())
    try:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "add", name], check=True)
        make_bed()
        names = netbed.list_netns()
        assert stale not in names
        assert live in names
    finally:
        netbed.delete_netns(stale)
        netbed.delete_netns(live)


def test_link_down_stops_traffic_and_up_restores_it(bed):
    probe = [sys.executable, "-c",
             "import socket,sys; socket.create_connection((sys.argv[1], 5201), timeout=1)",
             SERVER_ADDR]
    server = bed.iperf3_server(one_off=False)
    assert bed.exec_in(bed.client_ns, probe, check=False).returncode == 0
    bed.link(up=False)
    assert bed.exec_in(bed.client_ns, probe, check=False).returncode != 0
    bed.link(up=True)
    assert bed.exec_in(bed.client_ns, probe, check=False).returncode == 0
    assert server.poll() is None


# --- the scripts on the bed, as in production ---

PORT = 5201
DURATION = 2
STREAMS = 2
MARGIN = 2
SLACK = 5  # seconds allowed beyond the hard limits for process start, JSON, files


class Hosts:
    """iperf_server.py on the bed's server host and iperf_client.py on its client host, with
    their files in one test's tmp_path."""

    def __init__(self, bed, folder):
        self.bed = bed
        self.folder = folder
        self.pidfile = folder / "iperf.pid"
        self.log_file = folder / "iperf_monitor.log"

    def server(self, *args):
        """Run the server script once in the server host; returns the CompletedProcess."""
        return self.bed.exec_in(
            self.bed.server_ns,
            [sys.executable, SERVER_SCRIPT, "--pidfile", self.pidfile, "--log-file",
             self.log_file, "-p", PORT, "-B", SERVER_ADDR] + list(args),
            check=False, timeout=60)

    def daemon_pid(self):
        with open(str(self.pidfile), "rb") as handle:
            return iperf_server.parse_pidfile(handle.read())

    def client_argv(self, results, args, duration=DURATION, margin=MARGIN):
        return [sys.executable, CLIENT_SCRIPT, "-c", SERVER_ADDR, "-p", PORT,
                "-t", duration, "-P", STREAMS, "-d", self.folder / results,
                "--timeout-margin", margin] + list(args)

    def client(self, *args, results="results", duration=DURATION, margin=MARGIN):
        """Run the client script once in the client host; returns (CompletedProcess, seconds)."""
        start = time.monotonic()
        done = self.bed.exec_in(self.bed.client_ns,
                                self.client_argv(results, args, duration, margin),
                                check=False, timeout=120)
        return done, time.monotonic() - start

    def client_in_background(self, *args, results="results", duration=DURATION,
                             margin=MARGIN):
        return self.bed.popen_in(self.bed.client_ns,
                                 self.client_argv(results, args, duration, margin))

    def ledger(self, results="results"):
        """The ledger's rows, each checked against the JSON file it names."""
        with open(str(self.folder / results / "results.csv"), newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            with open(str(self.folder / results / row["file"])) as handle:
                document = json.load(handle)
            assert ("error" in document) == (row["status"] == "error"), row
        return rows

    def report(self, results="results"):
        """`iperf_client.py report --format json` run on the client host; returns its summary."""
        done = self.bed.exec_in(
            self.bed.client_ns,
            [sys.executable, CLIENT_SCRIPT, "report", "-d", self.folder / results,
             "--format", "json"], check=False, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["links"][0]["summary"]

    def wait_until_idle(self, timeout=30):
        """Wait until the server answers a tiny test (it is neither busy nor gone)."""
        probe = ["iperf3", "-c", SERVER_ADDR, "-p", PORT, "-n", "1K", "-i", "0.1", "-J",
                 "--connect-timeout", "1000"]

        def idle():
            done = self.bed.exec_in(self.bed.client_ns, probe, check=False, timeout=10)
            return '"error"' not in done.stdout and done.returncode == 0

        return netbed.wait_for(idle, timeout=timeout, interval=0.5)

    def stop(self):
        """Stop the daemon the server script started (destroy() kills whatever is left). Only a
        process of the server host: a stale pidfile may name a recycled PID."""
        try:
            pid = self.daemon_pid()
        except (OSError, TypeError, ValueError):
            return
        if pid in netbed.netns_pids(self.bed.server_ns):
            kill_pid(pid)


@pytest.fixture
def make_hosts(make_bed, tmp_path):
    """Factory: `make_hosts(forward, reverse)` builds a bed and returns its Hosts."""
    made = []

    def make(forward=None, reverse=None):
        hosts = Hosts(make_bed(forward, reverse), tmp_path)
        made.append(hosts)
        return hosts

    try:
        yield make
    finally:
        for hosts in made:
            hosts.stop()


@pytest.fixture
def hosts(make_hosts):
    """A server host running iperf_server.py, on a 50 Mbit/s forward, 20 Mbit/s reverse link."""
    hosts = make_hosts(Shape(FWD_MBIT), Shape(REV_MBIT))
    assert_quiet_success(hosts.server())
    return hosts


def by_direction(rows):
    return {row["direction"]: row for row in rows}


def test_server_bound_to_its_host_address_passes_its_probe(hosts):
    status = hosts.server("--status")
    assert status.returncode == 0, (status.stdout, status.stderr)
    # Bound to 198.18.0.1 only: the server host's loopback has nothing on the port.
    probe = [sys.executable, "-c",
             "import socket; socket.create_connection(('127.0.0.1', %d), timeout=1)" % PORT]
    assert hosts.bed.exec_in(hosts.bed.server_ns, probe, check=False).returncode != 0
    assert hosts.daemon_pid() in netbed.netns_pids(hosts.bed.server_ns)


def test_reported_figures_match_plain_iperf3_and_the_shaped_rates(hosts):
    raw = {"forward": [], "reverse": []}
    for _ in range(3):
        done, _ = hosts.client()
        assert_quiet_success(done)
        # Plain iperf3 against the same daemon over the same link, between the script's runs.
        for direction, extra in (("forward", []), ("reverse", ["-R"])):
            result = hosts.bed.raw_iperf3_client(["-t", DURATION, "-P", STREAMS] + extra)
            assert "error" not in result, (direction, result["error"])
            raw[direction].append(result["end"]["sum_received"]["bits_per_second"])
    rows = hosts.ledger()
    assert [row["status"] for row in rows] == ["ok"] * 6
    summary = hosts.report()
    for direction, rate in (("forward", FWD_MBIT), ("reverse", REV_MBIT)):
        ours = summary[direction]["median_bps"]
        assert ours == statistics.median(float(row["received_bps"]) for row in rows
                                         if row["direction"] == direction)
        # Measured: the two agree to 0.1 %; both are 96.7 % of the shaped rate (TCP payload
        # of 1500-byte packets). A few percent of tolerance, as the issue asks, beyond what
        # plain iperf3's own runs spread over: on a busy host they were seen 42.5 to 47.8
        # Mbit/s apart in one test, where a median of three against three is no measure.
        low, high = min(raw[direction]), max(raw[direction])
        assert low * 0.97 <= ours <= high * 1.03, (direction, ours, raw, rows)
        assert rate * 0.85 < mbit(ours) <= rate * 1.02, (direction, ours, rows)


def test_loss_shows_up_as_retransmits_in_the_ledger(make_hosts):
    hosts = make_hosts(Shape(FWD_MBIT, loss_pct=2), Shape(REV_MBIT, loss_pct=2))
    assert_quiet_success(hosts.server())
    done, _ = hosts.client()
    assert_quiet_success(done)
    rows = by_direction(hosts.ledger())
    for direction in ("forward", "reverse"):
        row = rows[direction]
        assert row["status"] == "ok"
        with open(str(hosts.folder / "results" / row["file"])) as handle:
            sent_bytes = json.load(handle)["end"]["sum_sent"]["bytes"]
        # About 2 % of the packets are lost and sent again.
        assert int(row["retransmits"]) > sent_bytes / 1448.0 * 0.01, row
        assert hosts.report()[direction]["retransmits"] == int(row["retransmits"])


def test_a_50ms_round_trip_still_gives_sensible_figures(make_hosts):
    hosts = make_hosts(Shape(FWD_MBIT, delay_ms=25), Shape(REV_MBIT, delay_ms=25))
    assert_quiet_success(hosts.server())
    done, _ = hosts.client()
    assert_quiet_success(done)
    rows = by_direction(hosts.ledger())
    for direction, rate in (("forward", FWD_MBIT), ("reverse", REV_MBIT)):
        # Slow start over 50 ms costs part of a 2 s test: measured 43 of 50 and 18 of 20.
        assert rate * 0.6 < mbit(float(rows[direction]["received_bps"])) <= rate * 1.02
    # The client measures the round trip when it sends (forward).
    with open(str(hosts.folder / "results" / rows["forward"]["file"])) as handle:
        rtt_us = json.load(handle)["end"]["streams"][0]["sender"]["mean_rtt"]
    assert 50 <= rtt_us / 1000.0 < 150


def test_link_down_mid_test_fails_both_tests_in_time_and_the_next_run_succeeds(hosts):
    start = time.monotonic()
    client = hosts.client_in_background("--retries", "0", duration=3)
    time.sleep(1)
    hosts.bed.link(up=False)
    _, stderr = client.communicate(timeout=60)
    elapsed = time.monotonic() - start
    assert client.returncode == 1, stderr
    # Forward hangs until its hard limit; reverse can't even connect.
    assert elapsed < 2 * (3 + MARGIN) + SLACK
    rows = by_direction(hosts.ledger())
    assert rows["forward"]["status"] == rows["reverse"]["status"] == "error"
    assert "timed out after" in rows["forward"]["error"]
    # 3.9 loses the reason ("unable to send control message: Bad file descriptor").
    assert says(rows["reverse"]["error"], ("unreachable", "Bad file descriptor"))
    assert "forward" in stderr and "reverse" in stderr
    summary = hosts.report()
    assert summary["forward"]["failed"] == summary["reverse"]["failed"] == 1

    hosts.bed.link(up=True)
    # The server first finishes the interrupted test: the client host's kernel still delivers
    # what the killed iperf3 had queued. Then the next run succeeds.
    assert hosts.wait_until_idle()
    done, _ = hosts.client(results="after")
    assert_quiet_success(done)
    assert [row["status"] for row in hosts.ledger("after")] == ["ok", "ok"]


def test_link_flapping_mid_test_neither_hangs_nor_loses_results(hosts):
    client = hosts.client_in_background("--retries", "0", duration=3)
    time.sleep(1)
    hosts.bed.link(up=False)
    time.sleep(2)
    hosts.bed.link(up=True)
    _, stderr = client.communicate(timeout=60)
    assert client.returncode in (0, 1), stderr
    rows = hosts.ledger()
    assert [row["direction"] for row in rows] == ["forward", "reverse"]
    assert (client.returncode == 0) == all(row["status"] == "ok" for row in rows)
    files = sorted(path.name for path in (hosts.folder / "results").iterdir()
                   if path.suffix == ".json")
    assert files == sorted(row["file"] for row in rows)


def test_daemon_killed_mid_test_is_recorded_and_restored_by_the_next_server_run(hosts):
    client = hosts.client_in_background("--retries", "0", duration=3)
    time.sleep(1)
    old = hosts.daemon_pid()
    os.kill(old, signal.SIGKILL)
    _, stderr = client.communicate(timeout=60)
    assert client.returncode == 1, stderr
    rows = by_direction(hosts.ledger())
    assert rows["forward"]["status"] == rows["reverse"]["status"] == "error"
    assert rows["forward"]["error"] and rows["reverse"]["error"]

    assert_quiet_success(hosts.server())
    assert hosts.daemon_pid() != old
    assert netbed.pid_alive(hosts.daemon_pid())
    done, _ = hosts.client(results="after")
    assert_quiet_success(done)


def test_stopped_daemon_times_the_client_out_and_is_replaced(hosts):
    old = hosts.daemon_pid()
    os.kill(old, signal.SIGSTOP)
    done, elapsed = hosts.client("--retries", "0")
    assert done.returncode == 1, done.stderr
    assert elapsed < 2 * (DURATION + MARGIN) + SLACK
    rows = by_direction(hosts.ledger())
    for direction in ("forward", "reverse"):
        assert rows[direction]["status"] == "error"
        assert rows[direction]["error"].startswith("timed out after %d s" % (DURATION + MARGIN))

    done = hosts.server()
    assert done.returncode == 0, (done.stderr, hosts.log_file.read_text())
    assert_quiet_success(done)
    assert hosts.daemon_pid() != old
    assert not netbed.pid_alive(old)
    assert netbed.pid_alive(hosts.daemon_pid())
    done, _ = hosts.client(results="after")
    assert_quiet_success(done)


def test_busy_server_is_waited_out(hosts):
    holder = hosts.bed.popen_in(
        hosts.bed.client_ns,
        ["iperf3", "-c", SERVER_ADDR, "-p", PORT, "-t", "3", "--forceflush"])
    # Wait for the holder's first interval line: its test is running.
    for line in holder.stdout:
        if " sec " in line:
            break
    done, _ = hosts.client("--busy-wait", "8")
    assert_quiet_success(done)
    assert holder.wait(timeout=30) == 0
    rows = by_direction(hosts.ledger())
    assert rows["forward"]["status"] == rows["reverse"]["status"] == "ok"
    assert int(rows["forward"]["attempts"]) >= 2


# --- beyond throughput: latency under load, UDP loss and jitter (issue 14) ---

def test_latency_under_load_each_way_on_a_50ms_round_trip_with_a_deep_queue(make_hosts):
    """Both ways, forward from the client's own sockets and reverse from the server's (which the
    watchdog's daemon sends in JSON, for --get-server-output):
    - paced well below the link's rate, a packet a write (no queue builds, and ACKs come
      promptly), the ledger's minimum RTT is the path's, 50 ms (25 each way): measured 50.2;
    - at full load the shaper's queue (30 ms + a round trip deep) fills: the mean RTT rises
      above the minimum, and the report's "added by the load" is that rise.
    iperf3's minimum is the lowest of its per-interval smoothed RTT samples, not the kernel's
    own minimum: under a standing queue it never sees the path's."""
    hosts = make_hosts(Shape(FWD_MBIT, delay_ms=25), Shape(REV_MBIT, delay_ms=25))
    assert_quiet_success(hosts.server())
    done, _ = hosts.client("--prefix", "paced.", "--", "-b", "8M", "-l", "1448", duration=3)
    assert_quiet_success(done)
    base = {}
    for row in hosts.ledger():
        print(row["direction"], "paced: min RTT %s ms, mean %s ms" % (
            row["min_rtt_ms"], row["mean_rtt_ms"]))
        # Up to 8 ms over the path: the wire is a process of this machine, and a busy host
        # delayed it 5-7 ms (55.4 and 56.8 in one CI run); a queue shows 77 ms and more.
        assert 45 <= float(row["min_rtt_ms"]) <= 58, row
        base[row["direction"]] = float(row["min_rtt_ms"])
    done, _ = hosts.client("--prefix", "loaded.", duration=4)
    assert_quiet_success(done)
    loaded = [row for row in hosts.ledger() if row["prefix"] == "loaded."]
    for row in loaded:
        low, mean = float(row["min_rtt_ms"]), float(row["mean_rtt_ms"])
        print(row["direction"], "loaded: min RTT %.1f ms, mean %.1f ms" % (low, mean))
        # The queue the test itself filled: measured 77-109 ms over the path's 50.
        assert mean > low and mean > base[row["direction"]] * 1.2, row
    done = hosts.bed.exec_in(
        hosts.bed.client_ns, [sys.executable, CLIENT_SCRIPT, "report", "-d",
                              hosts.folder / "results", "--prefix", "loaded.", "--format",
                              "json"], check=False, timeout=60)
    summary = json.loads(done.stdout)["links"][0]["summary"]
    for direction in ("forward", "reverse"):
        stats = summary[direction]
        assert stats["added_delay_ms"] == pytest.approx(
            stats["median_rtt_ms"] - stats["median_min_rtt_ms"])
        assert stats["added_delay_ms"] > 0, stats


def test_udp_loss_and_jitter_reach_the_ledger_and_the_check(make_hosts):
    hosts = make_hosts(Shape(FWD_MBIT, loss_pct=2), Shape(REV_MBIT, loss_pct=2))
    assert_quiet_success(hosts.server())
    done, _ = hosts.client("--udp", "10M", duration=4)
    assert_quiet_success(done)
    rows = by_direction(hosts.ledger())
    for direction in ("forward", "reverse"):
        row = rows[direction]
        print(direction, "lost %s%% of %s packets, jitter %s ms, received %s" % (
            row["lost_percent"], row["packets"], row["jitter_ms"], row["received_bps"]))
        assert row["protocol"] == "udp" and row["status"] == "ok"
        assert 1.0 <= float(row["lost_percent"]) <= 3.5, row  # 2 % asked, about 3,400 packets
        assert int(row["lost_packets"]) > 0 and int(row["packets"]) > 1000
        assert 0 <= float(row["jitter_ms"]) < 20
        assert row["min_rtt_ms"] == row["mean_rtt_ms"] == ""  # UDP has no RTT
    check = hosts.bed.exec_in(
        hosts.bed.client_ns, [sys.executable, CLIENT_SCRIPT, "report", "-d",
                              hosts.folder / "results", "--check", "--warn-loss", "1",
                              "--crit-loss", "10"], check=False)
    assert check.returncode == 1 and check.stdout.startswith("WARNING - "), check.stdout
    assert "forward_loss=" in check.stdout and "UDP" in check.stdout
