"""Tests of `--prometheus-textfile`: real iperf3 runs on random loopback ports, the textfile read
back by the official prometheus_client parser and compared with the ledger."""

import csv
import fcntl
import os
import threading
import time

import pytest

from prometheus_client.parser import text_string_to_metric_families

from conftest import CLIENT_SCRIPT, QUICK, ledger_cells, paced, run_script

import iperf_client

METRICS = ("iperf_received_bits_per_second", "iperf_sent_bits_per_second", "iperf_retransmits",
           "iperf_success", "iperf_last_run_timestamp_seconds")


def read_ledger(folder):
    with open(os.path.join(str(folder), "results.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def read_textfile(path):
    """{metric: {(server, port, direction or None): value}} through prometheus_client, with
    every family checked to be a documented gauge."""
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == "gauge" and family.documentation, family.name
        for sample in family.samples:
            labels = sample.labels
            assert {"client", "label", "server", "port"} <= set(labels), sample  # 2.3: who, what
            key = (labels["server"], labels["port"], labels.get("direction"))
            found.setdefault(sample.name, {})[key] = sample.value
    return found


def client(port, folder, textfile, *more):
    args = ["--server", "127.0.0.1", "--port", port, *QUICK, "-P", "2", "-d", folder,
            "--prometheus-textfile", textfile, *more]
    return run_script(CLIENT_SCRIPT, paced(args))


def assert_matches_ledger(metrics, rows, port):
    """The textfile's series of one server/port equal the ledger's latest run."""
    port = str(port)
    run = [r for r in rows if r["port"] == port and r["run"] == rows[-1]["run"]]
    assert metrics["iperf_last_run_timestamp_seconds"][("127.0.0.1", port, None)] == min(
        iperf_client.row_time(r["timestamp"]) for r in run)
    for r in run:
        key = ("127.0.0.1", port, r["direction"])
        ok = r["status"] == "ok"
        assert metrics["iperf_success"][key] == (1 if ok else 0)
        for metric, column in (("iperf_received_bits_per_second", "received_bps"),
                               ("iperf_sent_bits_per_second", "sent_bps"),
                               ("iperf_retransmits", "retransmits")):
            if ok:
                assert metrics[metric][key] == float(r[column]), metric
            else:
                assert key not in metrics.get(metric, {}), metric  # never a fake 0 bits/s


@pytest.mark.slow
def test_good_run_then_failed_run(iperf3_server, tmp_path):
    folder, prom = tmp_path / "results", tmp_path / "textfile" / "iperf.prom"
    prom.parent.mkdir()
    done = client(iperf3_server.port, folder, prom)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    text = prom.read_text()
    for metric in METRICS:
        assert "# HELP %s " % metric in text and "# TYPE %s gauge\n" % metric in text
    metrics = read_textfile(prom)
    assert_matches_ledger(metrics, read_ledger(folder), iperf3_server.port)
    assert metrics["iperf_received_bits_per_second"][
        ("127.0.0.1", str(iperf3_server.port), "forward")] > 1e6
    assert os.listdir(str(prom.parent)) == ["iperf.prom"]  # no temporary file left
    assert oct(prom.stat().st_mode & 0o777) == "0o644"  # node_exporter may run as another user

    iperf3_server.stop()  # the same server, now down: both tests fail
    done = client(iperf3_server.port, folder, prom)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    rows = read_ledger(folder)
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error"]
    metrics = read_textfile(prom)
    assert_matches_ledger(metrics, rows, iperf3_server.port)
    assert "iperf_received_bits_per_second" not in metrics
    assert os.listdir(str(prom.parent)) == ["iperf.prom"]


@pytest.mark.slow
def test_two_clients_share_one_textfile(start_iperf3_server, tmp_path):
    first, second = start_iperf3_server(), start_iperf3_server()
    prom = tmp_path / "iperf.prom"
    assert client(first.port, tmp_path / "a", prom, "--prefix", "a-").returncode == 0
    assert client(second.port, tmp_path / "b", prom, "--prefix", "b-").returncode == 0
    metrics = read_textfile(prom)
    assert_matches_ledger(metrics, read_ledger(tmp_path / "a"), first.port)
    assert_matches_ledger(metrics, read_ledger(tmp_path / "b"), second.port)
    assert len(metrics["iperf_success"]) == 4
    second_lines = [line for line in prom.read_text().splitlines()
                    if 'port="%d"' % second.port in line]

    first.stop()
    assert client(first.port, tmp_path / "a", prom, "--prefix", "a-").returncode == 1
    metrics = read_textfile(prom)
    assert_matches_ledger(metrics, read_ledger(tmp_path / "a"), first.port)
    assert [line for line in prom.read_text().splitlines()
            if 'port="%d"' % second.port in line] == second_lines  # the other client's, kept
    assert sorted(os.listdir(str(tmp_path))) == ["a", "b", "iperf.prom"]


@pytest.mark.slow
def test_unwritable_textfile_is_one_error_line_and_the_results_stay(iperf3_server, tmp_path):
    folder = tmp_path / "results"
    done = client(iperf3_server.port, folder, tmp_path / "no-such-folder" / "iperf.prom")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Prometheus textfile" in lines[0]
    assert [r["status"] for r in read_ledger(folder)] == ["ok", "ok"]


# --- pure helpers and the shared file --------------------------------------------------------

def ledger_rows(server_port, direction_status):
    rows = []
    for index, (direction, status) in enumerate(direction_status):
        cells = {
            "timestamp": iperf_client.iso_time(1700000000 + 60 * index), "run": "x",
            "prefix": "", "direction": direction, "server": server_port[0],
            "port": str(server_port[1]), "streams": "2", "duration": "1", "status": status,
            "error": "" if status == "ok" else "boom", "sent_bps": "1000.5",
            "received_bps": "999.25", "retransmits": "" if direction == "reverse" else "4",
            "attempts": "1", "file": "f", "client": "me", "label": "lab"}
        rows.append(ledger_cells(cells))
    return rows


def test_label_values_are_escaped(tmp_path):
    server = 'odd"host\\name'
    text = iperf_client.prometheus_text("", ledger_rows((server, 5201), [("forward", "ok")]))
    prom = tmp_path / "x.prom"
    prom.write_text(text)
    metrics = read_textfile(prom)
    assert metrics["iperf_received_bits_per_second"] == {(server, "5201", "forward"): 999.25}
    again = iperf_client.prometheus_text(text, ledger_rows(("h", 1), [("forward", "ok")]))
    prom.write_text(again)
    assert set(read_textfile(prom)["iperf_success"]) == {(server, "5201", "forward"),
                                                         ("h", "1", "forward")}


def test_a_direction_not_tested_keeps_its_last_series():
    both = ledger_rows(("h", 1), [("forward", "ok"), ("reverse", "ok")])
    text = iperf_client.prometheus_text("", both)
    stopped = ledger_rows(("h", 1), [("forward", "error")])  # a run stopped by a signal
    text = iperf_client.prometheus_text(text, stopped)
    link = 'client="me",label="lab",server="h",port="1"'
    assert 'iperf_success{%s,direction="forward"} 0' % link in text
    assert 'iperf_success{%s,direction="reverse"} 1' % link in text
    assert 'iperf_received_bits_per_second{%s,direction="reverse"} 999.25' % link in text
    assert 'direction="forward"} 999.25' not in text


def test_writers_take_turns_on_the_folder_lock(tmp_path):
    """A writer waits while another holds the folder's flock (it reads, merges and renames
    under it), so two clients never lose each other's series; it gives up after `wait`."""
    prom = str(tmp_path / "iperf.prom")
    rows = ledger_rows(("h", 1), [("forward", "ok"), ("reverse", "ok")])
    holder = os.open(str(tmp_path), os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(OSError, match="locked"):
            iperf_client.write_textfile(prom, rows, wait=0.2)
        writer = threading.Thread(target=iperf_client.write_textfile, args=(prom, rows))
        writer.start()
        time.sleep(0.5)
        assert not os.path.exists(prom)  # still waiting for its turn
        fcntl.flock(holder, fcntl.LOCK_UN)
        writer.join(timeout=10)
    finally:
        os.close(holder)
    assert len(read_textfile(tmp_path / "iperf.prom")["iperf_success"]) == 2
    assert os.listdir(str(tmp_path)) == ["iperf.prom"]


def test_flag_default_comes_from_the_settings():
    options = iperf_client.build_parser().parse_args([])
    assert options.prometheus_textfile == iperf_client.PROMETHEUS_TEXTFILE == ""
