"""Beyond throughput on loopback: RTT both ways in the ledger, old files rebuilt into the new
columns, the Prometheus gauges of RTT, jitter and loss. (Shaped links, a real delay and real
loss: test_netbed.py; the relative check: test_check.py.)"""

import csv
import json

import pytest

from conftest import (CLIENT_SCRIPT, QUICK, IperfServer, free_port, ledger_cells, paced,
                      read_ledger, run_script)

import iperf_client


def measured(iperf3, tmp_path, server_extra=(), *args):
    """The results folder of one quiet, good client run against a real `iperf3 -s` (with
    `server_extra`) on loopback, stopped afterwards."""
    server = IperfServer(iperf3, free_port(), server_extra)
    try:
        folder = tmp_path / "results"
        done = run_script(CLIENT_SCRIPT, paced([*QUICK, "-P", "2", "-c", "127.0.0.1", "-p",
                                                server.port, "-d", folder, *args]))
        assert (done.returncode, done.stderr) == (0, "")
    finally:
        server.stop()
    return folder


@pytest.mark.slow
def test_rtt_both_ways_and_old_files_rebuilt_into_the_new_columns(iperf3, tmp_path):
    """Against a daemon that writes JSON (as iperf_server.py starts it), the reverse test's RTT
    is the server's own; then the folder is made what version 2.1 left (a 15-column ledger,
    files without the new metadata) and --rebuild fills the new columns from iperf3's figures
    in the files."""
    folder = measured(iperf3, tmp_path, ("--json",))
    rows = read_ledger(folder)
    for row in rows:
        low, mean = float(row["min_rtt_ms"]), float(row["mean_rtt_ms"])
        assert 0 < low <= mean < 1000, row  # loopback: tens of microseconds
        assert row["protocol"] == "tcp"
    reverse = json.loads((folder / rows[1]["file"]).read_text())
    assert set(reverse["server_output_json"]) <= {"start", "end", "error"}  # trimmed
    # What 2.1 left: no new metadata, a ledger of its 15 columns.
    for row in rows:
        path = folder / row["file"]
        document = json.loads(path.read_text())
        for key in ("client", "label", "protocol"):
            del document["continuous_iperf"][key]
        path.write_text(json.dumps(document))
    with open(str(folder / "results.csv"), "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(iperf_client.BASE_COLUMNS)
        writer.writerows([ledger_cells(row, iperf_client.BASE_COLUMNS) for row in rows])
    done = run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--rebuild", "--format", "json"])
    assert done.returncode == 0, done.stderr
    rebuilt = read_ledger(folder)
    assert [(row["protocol"], row["min_rtt_ms"], row["mean_rtt_ms"]) for row in rebuilt] == [
        (row["protocol"], row["min_rtt_ms"], row["mean_rtt_ms"]) for row in rows]
    summary = json.loads(done.stdout)["links"][0]["summary"]
    assert summary["reverse"]["median_rtt_ms"] == float(rows[1]["mean_rtt_ms"])


@pytest.mark.slow
def test_without_a_json_daemon_the_reverse_rtt_stays_empty(iperf3, tmp_path):
    forward, reverse = read_ledger(measured(iperf3, tmp_path))
    assert float(forward["mean_rtt_ms"]) > 0
    assert reverse["min_rtt_ms"] == reverse["mean_rtt_ms"] == ""  # never 0


@pytest.mark.slow
def test_udp_run_on_loopback_and_its_gauges(iperf3, tmp_path):
    prom = tmp_path / "iperf.prom"
    # 4 Mbit/s of 1460-byte datagrams (lo's own would be 32 KB: a datagram 2.5 % of a test, and
    # at 20 Mbit/s a receiver starved by the tests beside it lost 34 % at its socket buffer).
    # Here the buffer holds about a quarter second of sending. The loss figure's accuracy is the
    # test bed's test.
    folder = measured(iperf3, tmp_path, (), "--udp", "4M", "--prometheus-textfile", prom,
                      "--", "-l", "1460")
    rows = read_ledger(folder)
    for row in rows:
        assert row["protocol"] == "udp" and int(row["packets"]) > 200
        assert float(row["lost_percent"]) < 20 and float(row["jitter_ms"]) >= 0
        # 4 Mbit/s in all, 2 each for the two streams
        assert 3e6 < float(row["received_bps"]) < 4.2e6, row
    text = prom.read_text()
    port = rows[0]["port"]
    labels = 'client="%s",label="127.0.0.1",server="127.0.0.1",port="%s",protocol="udp",' \
        'direction="forward"' % (rows[0]["client"], port)
    assert "iperf_lost_ratio{%s} " % labels in text
    assert "iperf_jitter_seconds{%s} " % labels in text
    assert "iperf_rtt_seconds{" not in text  # UDP has none
    report = run_script(CLIENT_SCRIPT, ["report", "-d", folder])
    assert "UDP: median jitter" in report.stdout, report.stdout


def test_rtt_gauges_are_seconds():
    row = dict.fromkeys(iperf_client.LEDGER_COLUMNS, "")
    row.update(timestamp=iperf_client.iso_time(1700000000), server="h", port="1",
               direction="forward", status="ok", received_bps="5", protocol="tcp",
               min_rtt_ms="10.5", mean_rtt_ms="25.0")
    text = iperf_client.prometheus_text("", [ledger_cells(row)])
    labels = 'client="",label="",server="h",port="1",direction="forward"'
    assert 'iperf_rtt_seconds{%s} 0.025' % labels in text
    assert 'iperf_min_rtt_seconds{%s} 0.0105' % labels in text
    assert "protocol=" not in text  # TCP series keep the labels they always had


def test_trimmed_server_output_keeps_its_end():
    document = {"end": {}, "server_output_json": {"start": {"a": 1}, "intervals": [1, 2],
                                                  "end": {"streams": []}}}
    assert iperf_client.trim_server_output(document)["server_output_json"] == {
        "start": {"a": 1}, "end": {"streams": []}}
    rule = iperf_client.SUMMARY_RULE
    text = {"server_output_text": "Accepted\n[  5] 0.00-1.00 sec ...\n%s\n[ ID] sum\n" % rule}
    assert iperf_client.trim_server_output(text)["server_output_text"] == rule + "\n[ ID] sum\n"


def test_tcp_and_udp_runs_sharing_a_folder_are_never_mixed(tmp_path):
    """Two crontab lines, one TCP and one --udp, into one folder: two links, each its own
    figures; the check judges throughput on the TCP one and loss on the UDP one."""
    from conftest import row_at, write_ledger
    import time
    rows = []
    now = time.time()
    for index in range(4):
        moment = now - 600 * (4 - index)
        tcp = row_at(moment, "forward", 900e6)
        tcp["protocol"] = "tcp"
        udp = row_at(moment + 120, "forward", 50e6)
        udp.update(protocol="udp", jitter_ms="0.25", lost_percent="3.0", lost_packets="30",
                   packets="1000", file=udp["file"].replace("_client", "_u_client"))
        rows += [tcp, udp]
    write_ledger(tmp_path, rows)
    data = json.loads(run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--direction",
                                                 "forward", "--format", "json"]).stdout)
    links = {link["protocol"]: link for link in data["links"]}
    assert links["tcp"]["median_bps"]["forward"] == 900e6
    assert links["udp"]["median_bps"]["forward"] == 50e6
    assert links["udp"]["summary"]["forward"]["lost_percent"] == 3.0
    assert links["tcp"]["summary"]["forward"]["lost_percent"] is None
    assert links["udp"]["name"].endswith(" UDP")
    check = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--check", "--direction",
                                       "forward", "--warn-below", "500", "--crit-below", "100",
                                       "--warn-loss", "1", "--crit-loss", "5", "--max-age", "60"])
    # UDP at 50 Mbit/s is below --crit-below, but that limit is TCP's: loss 3 % > 1 % warns.
    assert check.returncode == 1, check.stdout
    assert "forward UDP 3.00% lost > 1%, jitter 0.25 ms" in check.stdout, check.stdout
    only_udp = json.loads(run_script(CLIENT_SCRIPT, [
        "report", "-d", tmp_path, "--protocol", "udp", "--format", "json", "--runs"]).stdout)
    assert list(only_udp) == ["runs", "links"] and len(only_udp["runs"]) == 4
    assert [link["protocol"] for link in only_udp["links"]] == ["udp"]


@pytest.mark.parametrize("extra", [["-u"], ["-uZ"], ["--udp"], ["-b", "5M", "-u"]])
def test_iperf3s_own_udp_flag_makes_a_udp_run(extra):
    options = iperf_client.build_parser().parse_args(["-c", "h"])
    options.extra = extra
    iperf_client.check_options(iperf_client.build_parser(), options)
    settings = iperf_client.run_settings(options, {})
    assert settings.protocol == "udp"
