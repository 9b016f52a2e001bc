"""The network test bed (issue 7): the scripts on a real, emulated link between two hosts.

Two hosts live in network namespaces with addresses from 198.18.0.0/15 (see netbed.py); the
link between them is shaped per direction. First the bed itself is checked with plain iperf3
(it measures the shaped rates, loss shows as retransmits, a 50 ms round trip works, teardown
leaves nothing), then the scripts run on it as in production: iperf_server.py on the server
host, iperf_client.py on the client host.

Needs root, iproute2 and /dev/net/tun: otherwise these tests skip, or fail under
REQUIRE_NETNS=1 (CI).
"""

import os
import subprocess

import pytest

import netbed
from conftest import require
from netbed import SERVER_ADDR, NetBed, Shape

pytestmark = pytest.mark.netns

FWD_MBIT = 50
REV_MBIT = 20


def mbit(bps):
    return bps / 1e6


@pytest.fixture
def make_bed():
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


def test_teardown_leaves_nothing_and_leftovers_are_cleaned(make_bed):
    bed = make_bed()
    # A daemon (it forks away from us) and a plain background process, as tests leave them.
    bed.exec_in(bed.server_ns, ["iperf3", "-s", "-D", "-B", SERVER_ADDR, "-p", "5201"])
    bed.popen_in(bed.client_ns, ["sleep", "300"])
    assert netbed.wait_for(lambda: len(netbed.netns_pids(bed.server_ns)) == 1)
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
    probe = ["python3", "-c",
             "import socket,sys; socket.create_connection((sys.argv[1], 5201), timeout=1)",
             SERVER_ADDR]
    server = bed.iperf3_server(one_off=False)
    assert bed.exec_in(bed.client_ns, probe, check=False).returncode == 0
    bed.link(up=False)
    assert bed.exec_in(bed.client_ns, probe, check=False).returncode != 0
    bed.link(up=True)
    assert bed.exec_in(bed.client_ns, probe, check=False).returncode == 0
    assert server.poll() is None
