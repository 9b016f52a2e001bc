"""Many links: several targets in one run, crontab lines sharing a folder, reports per link
across folders (a mesh), old ledgers continued. Real iperf3 servers on loopback ports; a fake
iperf3 only where many quick runs are needed."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import (CLIENT_SCRIPT, FAKE_RESULT, QUICK, IperfServer, free_port, kill_process,
                      old_rows, paced, read_ledger, run_script, wait_until)
from test_html import Page, chromium

import iperf_client

ONE_STREAM = [*QUICK, "-P", "1"]


def run_client(folder, *args):
    return run_script(CLIENT_SCRIPT, paced([*ONE_STREAM, "-d", folder, *args]))


def report(*args):
    return run_script(CLIENT_SCRIPT, ["report", *args])


def result_files(folder):
    return sorted(name for name in os.listdir(str(folder)) if name.endswith(".json"))


# --- targets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("198.18.0.1", ("198.18.0.1", 5201, "")),
    ("198.18.0.1:5202", ("198.18.0.1", 5202, "")),
    ("dc1=host.example:7", ("host.example", 7, "dc1")),
    ("[2001:db8::1]:5203", ("2001:db8::1", 5203, "")),
    ("[::1]", ("::1", 5201, "")),
    ("2001:db8::1", ("2001:db8::1", 5201, "")),
    ("fe80::1%eth0", ("fe80::1%eth0", 5201, "")),
])
def test_target_spellings(text, expected):
    assert tuple(iperf_client.parse_target(text, 5201)) == expected


@pytest.mark.parametrize("text", ["host:0", "host:99999", "host:x", "[::1", "[::1]5201",
                                  "1.2.3.4:80:90", "[1.2.3.4]:80",
                                  "-host", "a b", "bad label=host", "CHANGE_TO_IP", ""])
def test_bad_targets_are_refused(text):
    with pytest.raises(ValueError):
        iperf_client.parse_target(text, 5201)


def test_labels_default_to_the_host_and_must_not_collide():
    targets = [iperf_client.parse_target(text, 5201)
               for text in ("198.18.0.1", "198.18.0.1:5202", "[2001:db8::1]:5201")]
    labels = [target.label for target in iperf_client.labelled_targets(targets, 5201)]
    assert labels == ["198.18.0.1", "198.18.0.1_5202", "2001-db8--1"]
    with pytest.raises(ValueError, match="given twice"):
        iperf_client.labelled_targets(targets + [targets[0]], 5201)
    clash = [iperf_client.parse_target(t, 5201) for t in ("x=h1", "x=h2")]
    with pytest.raises(ValueError, match="share the label 'x'"):
        iperf_client.labelled_targets(clash, 5201)


def test_a_targets_file_with_a_bad_line_is_refused_and_nothing_is_written(tmp_path):
    targets = tmp_path / "targets"
    targets.write_text("# data centres\n198.18.0.1 dc1   # the main one\n\n"
                       "198.18.0.2:5202 dc2\nnot a:target line\n")
    folder = tmp_path / "results"
    done = run_client(folder, "--targets", targets)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "line 5" in done.stderr and str(targets) in done.stderr
    assert "Traceback" not in done.stderr and not folder.exists()
    targets.write_text("# data centres\n198.18.0.1 dc1   # the main one\n\n"
                       "198.18.0.2:5202 dc2\n")
    done = run_client(folder, "--targets", targets, "--dry-run")
    assert done.returncode == 0 and not folder.exists()
    assert [line.split()[2:5] for line in done.stdout.splitlines()] == [
        ["198.18.0.1", "-p", "5201"], ["198.18.0.1", "-p", "5201"],
        ["198.18.0.2", "-p", "5202"], ["198.18.0.2", "-p", "5202"]]


# --- runs ---------------------------------------------------------------------------------------

@pytest.fixture
def two_servers(iperf3):
    servers = [IperfServer(iperf3, free_port()) for _ in range(2)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_a_two_target_run_names_each_targets_files_and_reports_per_link(two_servers, tmp_path):
    folder = tmp_path / "results"
    first, second = ("a=127.0.0.1:%d" % two_servers[0].port,
                     "b=127.0.0.1:%d" % two_servers[1].port)
    done = run_client(folder, "--server", first, "--server", second, "--client-name", "lab")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    stamp = [name for name in os.listdir(str(folder)) if name.endswith("_iperf_mon.log")]
    assert len(stamp) == 1  # one log for the run
    run_ts = stamp[0][:15]
    assert result_files(folder) == ["%s_%s_%s.json" % (run_ts, label, side)
                                    for label in ("a", "b") for side in ("client", "server")]
    rows = read_ledger(folder)
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        port = two_servers[0].port if row["label"] == "a" else two_servers[1].port
        assert (row["server"], row["port"], row["client"]) == ("127.0.0.1", str(port), "lab")
        assert row["file"] == "%s_%s_%s.json" % (run_ts, row["label"], "client"
                                                 if row["direction"] == "forward" else "server")
        assert row["protocol"] == "tcp"
        if row["direction"] == "forward":  # this host's own sockets' RTT, in ms
            assert 0 < float(row["min_rtt_ms"]) <= float(row["mean_rtt_ms"]) < 1000
        else:  # the server's sockets: iperf3 gives the client zeros, left empty
            assert row["min_rtt_ms"] == row["mean_rtt_ms"] == ""
    # each target's forward then reverse, one target after the other
    assert [row["label"] for row in rows][::2] == [row["label"] for row in rows][1::2]
    text = report("-d", folder)
    assert text.returncode == 0, text.stderr
    assert "links (median received" in text.stdout
    assert text.stdout.count("== a (127.0.0.1:%d) ==" % two_servers[0].port) == 1
    assert text.stdout.count("== b (127.0.0.1:%d) ==" % two_servers[1].port) == 1
    data = json.loads(report("-d", folder, "--format", "json", "--runs").stdout)
    assert [(link["label"], link["port"]) for link in data["links"]] == sorted(
        [("a", two_servers[0].port), ("b", two_servers[1].port)], key=lambda pair: pair[1])
    assert all(link["summary"]["forward"]["ok"] == 1 for link in data["links"])
    assert len(data["runs"]) == 4
    one = json.loads(report("-d", folder, "--format", "json", "--runs", "--server",
                            "127.0.0.1:%d" % two_servers[1].port).stdout)
    assert list(one) == ["runs", "links"] and len(one["links"]) == 1
    assert one["links"][0]["summary"]["reverse"]["ok"] == 1
    assert {run["label"] for run in one["runs"]} == {"b"}


def test_targets_take_turns_at_going_first(tmp_path):
    # Ten runs of three targets: a shell script stands in for iperf3 (60 tests, quickly).
    result = {"start": {"test_start": {"protocol": "TCP"}}, "intervals": [],
              "end": {"sum_sent": {"bits_per_second": 1000.5, "retransmits": 3},
                      "sum_received": {"bits_per_second": 900.25}}}
    (tmp_path / "result.json").write_text(json.dumps(result))
    fake = tmp_path / "iperf3"
    fake.write_text("#!/bin/sh\nexec cat %s\n" % (tmp_path / "result.json"))
    fake.chmod(0o755)
    folder = tmp_path / "results"
    for run in range(10):  # a prefix each: runs in the same second need not wait for the next
        done = run_client(folder, "--iperf3", fake, "-c", "x=h1", "-c", "y=h2", "-c", "z=h3",
                          "--prefix", "r%d." % run)
        assert done.returncode == 0, done.stderr
    rows = read_ledger(folder)
    firsts = [rows[index]["label"] for index in range(0, len(rows), 6)]
    assert len(firsts) == 10 and len(set(firsts)) >= 2, firsts  # all alike: (1/3)^9
    for start in range(0, len(rows), 6):
        assert sorted(row["label"] for row in rows[start:start + 6]) == list("xxyyzz")


def test_one_target_writes_todays_names(two_servers, tmp_path):
    folder = tmp_path / "results"
    done = run_client(folder, "--server", "127.0.0.1:%d" % two_servers[0].port)
    assert done.returncode == 0, done.stderr
    assert [name[15:] for name in result_files(folder)] == ["_client.json", "_server.json"]


@pytest.mark.slow
def test_ipv6_loopback(iperf3, tmp_path):
    port = free_port()
    server = subprocess.Popen([iperf3, "-s", "-B", "::1", "-p", str(port)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        # /proc/net/tcp6 holds the listener: no probe connection (iperf3 counts it as a test).
        assert wait_until(lambda: ":%04X " % port in open("/proc/net/tcp6").read())
        folder = tmp_path / "results"
        done = run_client(folder, "--server", "[::1]:%d" % port)
        assert (done.returncode, done.stderr) == (0, "")
        rows = read_ledger(folder)
        assert [(row["server"], row["status"]) for row in rows] == [("::1", "ok")] * 2
        bare = run_client(folder, "--server", "::1", "-p", str(port), "--dry-run")
        assert bare.stdout.split()[:5] == [iperf_client.IPERF_EXECUTABLE, "-c", "::1", "-p",
                                           str(port)]
        text = report("-d", folder, "--server", "[::1]:%d" % port)
        assert text.returncode == 0 and "2 runs" not in text.stdout and "1 run" in text.stdout
    finally:
        kill_process(server)


@pytest.mark.slow
def test_two_crontab_lines_started_together_are_both_measured(two_servers, tmp_path):
    """Two lines sharing a folder, started in the same second: the second waits for the lock
    (the interval leaves room) instead of losing its run."""
    folder = tmp_path / "results"
    procs = [subprocess.Popen(
        [sys.executable, str(CLIENT_SCRIPT), *paced([*ONE_STREAM, "-d", folder, "--prefix", prefix,
                                                     "--server", "127.0.0.1:%d" % server.port,
                                                     "--interval", "60"])],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True) for prefix, server in zip(("one.", "two."), two_servers)]
    try:
        outcomes = [proc.communicate(timeout=60) + (proc.returncode,) for proc in procs]
    finally:
        for proc in procs:
            kill_process(proc)
    assert outcomes == [("", "", 0)] * 2
    rows = read_ledger(folder)
    assert sorted((row["prefix"], row["direction"], row["status"]) for row in rows) == [
        (prefix, direction, "ok") for prefix in ("one.", "two.")
        for direction in ("forward", "reverse")]


def test_a_run_that_cannot_fit_its_interval_says_so_in_one_line(tmp_path, fake_iperf3):
    fake = fake_iperf3(FAKE_RESULT + "\nprint(json.dumps(doc))\n")
    folder = tmp_path / "results"
    done = run_client(folder, "--iperf3", fake, "-c", "h1", "-c", "h2", "-t", "10",
                      "--interval", "30")
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "needs about 48 s" in lines[0], done.stderr
    assert "2 targets x 2 tests" in lines[0] and "30 s interval" in lines[0]
    assert run_client(folder, "--iperf3", fake, "-c", "h1", "-t", "10").stderr == ""


def test_a_run_writes_every_targets_prometheus_series(tmp_path, fake_iperf3):
    fake = fake_iperf3(FAKE_RESULT + "\nprint(json.dumps(doc))\n")
    prom = tmp_path / "iperf.prom"
    done = run_client(tmp_path / "results", "--iperf3", fake, "-c", "h1", "-c", "h2:5300",
                      "--prometheus-textfile", prom)
    assert done.returncode == 0, done.stderr
    text = prom.read_text()
    client = 'client="%s"' % socket.gethostname()
    for server, port, label in (("h1", "5201", "h1"), ("h2", "5300", "h2_5300")):
        link = '%s,label="%s",server="%s",port="%s"' % (client, label, server, port)
        for direction in ("forward", "reverse"):
            assert 'iperf_success{%s,direction="%s"} 1' % (link, direction) in text
        assert 'iperf_last_run_timestamp_seconds{%s}' % link in text


# --- old ledgers --------------------------------------------------------------------------------

def test_an_old_ledger_is_continued_by_a_new_run(tmp_path, fake_iperf3):
    """A ledger of version 2.1 (15 columns): a run gives it the new columns, empty, keeps every
    old row as it was, and the report and --rebuild read it."""
    folder = tmp_path / "results"
    folder.mkdir()
    rows = old_rows(3)
    with open(str(folder / "results.csv"), "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(iperf_client.BASE_COLUMNS)
        writer.writerows(rows)
    assert "3 runs" in report("-d", folder).stdout  # read as it is, before any run
    fake = fake_iperf3(FAKE_RESULT + "\nprint(json.dumps(doc))\n")
    done = run_client(folder, "--iperf3", fake, "-c", "h", "--client-name", "lab")
    assert done.returncode == 0, done.stderr
    with open(str(folder / "results.csv"), newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == list(iperf_client.LEDGER_COLUMNS)
    blank = [""] * len(iperf_client.ADDED_COLUMNS)
    assert lines[1:4] == [row + blank for row in rows]
    new = [dict(zip(lines[0], line)) for line in lines[4:]]
    assert [(row["client"], row["label"], row["status"]) for row in new] == [
        ("lab", "h", "ok")] * 2
    # The folder's old rows are the same client's: one link, not two.
    data = json.loads(report("-d", folder, "--format", "json").stdout)
    assert len(data["links"]) == 1 and data["links"][0]["summary"]["forward"]["count"] == 4
    assert report("-d", folder, "--rebuild").returncode == 0
    with open(str(folder / "results.csv"), newline="") as handle:
        rebuilt = list(csv.reader(handle))
    assert rebuilt[1:4] == lines[1:4] and len(rebuilt) == 6


# --- reports across links and folders -----------------------------------------------------------

def mesh(tmp_path, fake_iperf3):
    """Folders of two client hosts (as rsync would collect them), each testing two servers,
    one of which fails from the second client."""
    now = '\ndoc["start"]["timestamp"]["timesecs"] = int(time.time())\n'
    ok = fake_iperf3(FAKE_RESULT + now + "print(json.dumps(doc))\n")
    broken = fake_iperf3(FAKE_RESULT + now + """
if "bad.example" in args:
    doc = {"start": {}, "intervals": [], "end": {}, "error": "unable to connect to server"}
print(json.dumps(doc))
""")
    folders = []
    for client, fake in (("alpha", ok), ("beta", broken)):
        folder = tmp_path / client
        for _ in range(2):
            done = run_client(folder, "--iperf3", fake, "--client-name", client,
                              "-c", "good.example", "-c", "bad.example")
            assert done.returncode == (0 if client == "alpha" else 1), done.stderr
        folders.append(folder)
    return folders


@pytest.mark.slow
def test_check_judges_each_link_and_names_the_worst(tmp_path, fake_iperf3):
    alpha, beta = mesh(tmp_path, fake_iperf3)
    thresholds = ["--warn-below", "0.0005", "--crit-below", "0.0001"]
    done = report("-d", alpha, "--check", *thresholds)
    assert done.returncode == 0 and done.stdout.startswith("OK - 2 links: 2 OK;"), done.stdout
    done = report("-d", alpha, "-d", beta, "--check", *thresholds)
    line = done.stdout.strip()
    assert done.returncode == 2, line
    assert line.startswith("CRITICAL - 4 links: 1 CRITICAL, 3 OK; beta -> bad.example:5201: "
                           "forward test failed"), line
    assert "beta_-_bad.example_5201_forward=U" in line.split(" | ")[1]
    only = report("-d", alpha, "-d", beta, "--check", *thresholds, "--server", "good.example")
    assert only.returncode == 0, only.stdout


@pytest.mark.slow
def test_report_across_two_folders_and_the_mesh_page_in_a_browser(tmp_path, fake_iperf3):
    alpha, beta = mesh(tmp_path, fake_iperf3)
    text = report("-d", alpha, "-d", beta)
    assert text.returncode == 0, text.stderr
    for name in ("alpha -> good.example:5201", "alpha -> bad.example:5201",
                 "beta -> good.example:5201", "beta -> bad.example:5201"):
        assert "== %s ==" % name in text.stdout
    assert "100.0% failed" in text.stdout
    page_path = tmp_path / "mesh.html"
    assert report("-d", alpha, "-d", beta, "--html", page_path).returncode == 0
    dom = Page(chromium(tmp_path, "--dump-dom", page_path.as_uri()))
    tables = {css: [] for css in ("overview", "matrix")}
    current = None
    for tag, attributes, text_after in dom.elements:
        if tag == "table":
            current = attributes.get("class")
        elif tag == "td" and current in tables:
            tables[current].append(text_after.strip())
    overview = tables["overview"]
    assert len(overview) == 4 * 6  # link (its text in a link to its section), two medians,
    assert overview[1:4] == ["900 bit/s", "901 bit/s", "0.0"]  # failed %, latest test, age
    assert [overview[row * 6 + 3] for row in range(4)] == ["0.0", "0.0", "100.0", "0.0"]
    anchors = [(attributes["href"], text_after) for tag, attributes, text_after in dom.elements
               if tag == "a"]
    assert [name for _, name in anchors] == [
        "alpha -> bad.example:5201", "alpha -> good.example:5201",
        "beta -> bad.example:5201", "beta -> good.example:5201"]
    ids = {attributes.get("id") for _, attributes, _ in dom.elements}
    assert all(href[1:] in ids for href, _ in anchors)
    matrix = tables["matrix"]
    # rows: alpha, beta; columns: bad.example (forward, reverse), good.example (both)
    assert matrix[0] == "alpha" and matrix[5] == "beta"
    assert matrix[1:5] == ["900 bit/s", "901 bit/s", "900 bit/s", "901 bit/s"]
    assert matrix[6:8] == ["-", "-"] and matrix[8:10] == ["900 bit/s", "901 bit/s"]
    sections = [text_after for tag, attributes, text_after in dom.elements
                if tag == "h2" and attributes.get("class") == "link"]
    assert len(sections) == 4
    # Each link: throughput and by hour, but the one whose tests all failed: no hour chart.
    assert len([1 for tag, attributes, _ in dom.elements if tag == "svg"]) == 4 * 2 - 1
