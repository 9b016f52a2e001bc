"""Tests of `iperf_client.py report`, the ledger's rebuild, --compress and --keep-days."""

import csv
import fcntl
import gzip
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import pytest

from conftest import (CLIENT_SCRIPT, FAKE_RESULT, LEDGER_COLUMNS as COLUMNS, old_rows, read_ledger,
                      row_stamped, run_script, wait_until, write_ledger)

import iperf_client

SUMMARY_KEYS = ["count", "ok", "failed", "skipped", "min_bps", "p5_bps", "median_bps", "mean_bps",
                "p95_bps", "max_bps", "retransmits", "median_rtt_ms", "median_min_rtt_ms",
                "added_delay_ms", "latency_grade", "median_jitter_ms", "median_lost_percent",
                "lost_percent",
                "bytes", "test_seconds"]
THROUGHPUT_KEYS = SUMMARY_KEYS[:11]

# A fake iperf3 printing an iperf3-shaped result; INTERVALS streams x seconds makes it large.
FAKE = """
reverse = 1 if "-R" in args else 0
streams, seconds = %d, %d
doc = {"start": {"connecting_to": {"host": "h", "port": 5201},
                 "timestamp": {"timesecs": int(time.time())},
                 "test_start": {"num_streams": streams, "duration": seconds, "omit": 0,
                                "reverse": reverse}},
       "intervals": [{"streams": [{"socket": s, "start": t, "end": t + 1.0, "bytes": 12345678,
                                   "bits_per_second": 98765432.1, "retransmits": 0,
                                   "snd_cwnd": 123456, "rtt": 321, "omitted": False,
                                   "sender": True} for s in range(streams)],
                      "sum": {"start": t, "end": t + 1.0, "bits_per_second": 1.5e9}}
                     for t in range(seconds)],
       "end": {"streams": [{"sender": {"socket": s, "end": 60.0, "bits_per_second": 1.0},
                            "receiver": {"socket": s, "end": 60.0, "bits_per_second": 2.0}}
                           for s in range(streams)],
               "sum_sent": {"end": 60.0, "bits_per_second": 2000.5 + reverse, "retransmits": 7},
               "sum_received": {"end": 60.0, "bits_per_second": 1999.25 + reverse},
               "cpu_utilization_percent": {"host_total": 1.5}}}
print(json.dumps(doc, indent="\\t"))
"""


def report(capsys, folder, *args):
    code = iperf_client.main(["report", "-d", str(folder)] + list(args))
    out, err = capsys.readouterr()
    return code, out, err


def report_json(capsys, folder, *args):
    """The JSON of a folder of one link (3.0: its link's summary, in `links`), as 2.2 gave it:
    {"summary": ..., "runs": ...}."""
    code, out, err = report(capsys, folder, "--format", "json", "--runs", *args)
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert len(data["links"]) <= 1
    summary = data["links"][0]["summary"] if data["links"] else None
    return {"summary": summary, "runs": data["runs"]}


def utc(hour, minute=0, day=1):
    return "2024-03-%02dT%02d:%02d:00+00:00" % (day, hour, minute)


# --- statistics ---------------------------------------------------------------------------------

def test_statistics_from_known_values(tmp_path, capsys):
    forward = [100.0, 200.0, 300.0, 400.0, 1000.0]
    rows = [row_stamped(utc(10, i), received=repr(v), retransmits=str(i))
            for i, v in enumerate(forward)]
    rows.append(row_stamped(utc(11), status="error", error="boom", retransmits="99"))
    rows.append(row_stamped(utc(12), direction="reverse", received="50.5", retransmits="4"))
    write_ledger(tmp_path, rows)
    summary = report_json(capsys, tmp_path)["summary"]
    assert list(summary) == ["forward", "reverse"]
    assert list(summary["forward"]) == SUMMARY_KEYS
    # Closest-rank interpolation by hand: p5 at rank 0.2, p95 at rank 3.8 of 0..4.
    assert {key: summary["forward"][key] for key in THROUGHPUT_KEYS} == pytest.approx({
        "count": 6, "ok": 5, "failed": 1, "skipped": 0, "min_bps": 100.0,
        "p5_bps": 100.0 + 0.2 * 100.0,
        "median_bps": 300.0, "mean_bps": 400.0, "p95_bps": 400.0 + 0.8 * 600.0,
        "max_bps": 1000.0, "retransmits": 0 + 1 + 2 + 3 + 4}, rel=1e-12)
    assert {key: summary["reverse"][key] for key in THROUGHPUT_KEYS} == {
        "count": 1, "ok": 1, "failed": 0, "skipped": 0, "min_bps": 50.5, "p5_bps": 50.5,
        "median_bps": 50.5,
        "mean_bps": 50.5, "p95_bps": 50.5, "max_bps": 50.5, "retransmits": 4}
    # 5 ok forward tests of 60 s (row_stamped: sent = received); no RTT or UDP figures here.
    assert summary["forward"]["bytes"] == pytest.approx(sum(forward) * 60 / 8)
    assert summary["forward"]["test_seconds"] == 300
    assert summary["forward"]["median_rtt_ms"] is summary["forward"]["lost_percent"] is None


def test_percentiles_match_statistics_quantiles_inclusive(tmp_path, capsys):
    rng = random.Random(7)
    values = [rng.uniform(1e8, 1e9) for _ in range(997)]
    write_ledger(tmp_path, [row_stamped("2024-03-01T10:00:00+00:00", received=repr(v))
                            for v in values])
    stats = report_json(capsys, tmp_path, "--direction", "forward")["summary"]["forward"]
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    assert stats["p5_bps"] == pytest.approx(cuts[0], rel=1e-12)
    assert stats["p95_bps"] == pytest.approx(cuts[18], rel=1e-12)
    assert stats["median_bps"] == pytest.approx(statistics.median(values), rel=1e-12)
    assert stats["mean_bps"] == pytest.approx(statistics.fmean(values)
                                              if hasattr(statistics, "fmean")
                                              else statistics.mean(values), rel=1e-12)
    assert (stats["min_bps"], stats["max_bps"]) == (min(values), max(values))


def test_json_runs_are_the_ledger_rows_with_numbers(tmp_path, capsys):
    rows = [row_stamped(utc(10), received="123.5", retransmits="3"),
            row_stamped(utc(10, 1), direction="reverse", status="error",
                        error='refused: "quoted" \\ and, comma')]
    write_ledger(tmp_path, rows)
    runs = report_json(capsys, tmp_path)["runs"]
    assert list(runs[0]) == COLUMNS
    assert runs[0]["received_bps"] == 123.5 and runs[0]["retransmits"] == 3
    assert runs[0]["port"] == 5201 and runs[0]["attempts"] == 1 and runs[0]["run"] == rows[0]["run"]
    assert runs[1]["received_bps"] is None and runs[1]["error"] == rows[1]["error"]


def test_csv_format_is_the_selected_rows(tmp_path, capsys):
    rows = [row_stamped(utc(10), received="1.0"),
            row_stamped(utc(10, 1), direction="reverse", received="2.0"),
            row_stamped(utc(11), prefix="other", received="3.0")]
    write_ledger(tmp_path, rows)
    code, out, err = report(capsys, tmp_path, "--format", "csv", "--direction", "reverse")
    assert (code, err) == (0, "")
    assert list(csv.DictReader(out.splitlines())) == [rows[1]]
    code, out, err = report(capsys, tmp_path, "--format", "csv", "--prefix", "other")
    assert list(csv.DictReader(out.splitlines())) == [rows[2]]


# --- filters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ([], 4),
    (["--since", "2024-03-01T10:00:00+00:00"], 3),          # inclusive
    (["--since", "2024-03-01T10:00:01+00:00"], 2),
    (["--until", "2024-03-01T10:00:00+00:00"], 1),          # exclusive
    (["--until", "2024-03-01T10:00:00.001+00:00"], 2),
    (["--since", "2024-03-01T09:00:00Z", "--until", "2024-03-01T11:00:00+00:00"], 2),
    (["--since", "2024-03-01T11:00:00+01:00"], 3),          # 10:00 UTC
    (["--since", "2024-03-02"], 1),
])
def test_since_until_edges(tmp_path, capsys, args, expected):
    write_ledger(tmp_path, [row_stamped("2024-03-01T09:59:59+00:00", received="1"),
                            row_stamped("2024-03-01T10:00:00+00:00", received="2"),
                            row_stamped("2024-03-01T11:00:00+00:00", received="3"),
                            row_stamped("2024-03-02T12:00:00+00:00", received="4")])
    assert report_json(capsys, tmp_path, *args)["summary"]["forward"]["count"] == expected


def test_naive_dates_are_local_time(tmp_path, capsys):
    midnight = time.mktime((2024, 3, 5, 0, 0, 0, 0, 0, -1))
    write_ledger(tmp_path, [row_stamped(iperf_client.iso_time(midnight - 1), received="1"),
                            row_stamped(iperf_client.iso_time(midnight), received="2")])
    stats = report_json(capsys, tmp_path, "--since", "2024-03-05")["summary"]["forward"]
    assert (stats["count"], stats["max_bps"]) == (1, 2.0)
    stats = report_json(capsys, tmp_path, "--until", "2024-03-05T00:00")["summary"]["forward"]
    assert (stats["count"], stats["max_bps"]) == (1, 1.0)


def test_spans_back_from_now(tmp_path, capsys):
    now = time.time()
    write_ledger(tmp_path, [row_stamped(iperf_client.iso_time(now - age), received=str(age))
                            for age in (60, 2 * 3600, 2 * 86400, 30 * 86400)])
    for span, count in (("90m", 1), ("24h", 2), ("7d", 3), ("5w", 4)):
        assert report_json(capsys, tmp_path, "--since", span)["summary"]["forward"][
            "count"] == count
    assert report_json(capsys, tmp_path, "--until", "24h")["summary"]["forward"]["count"] == 2


def test_prefix_and_direction_select(tmp_path, capsys):
    write_ledger(tmp_path, [row_stamped(utc(10), received="1", prefix="a"),
                            row_stamped(utc(10), direction="reverse", received="2", prefix="a"),
                            row_stamped(utc(10), received="3", prefix="b")])
    summary = report_json(capsys, tmp_path, "--prefix", "a", "--direction", "reverse")["summary"]
    assert list(summary) == ["reverse"] and summary["reverse"]["max_bps"] == 2.0
    assert report_json(capsys, tmp_path)["summary"]["forward"]["count"] == 2


@pytest.mark.parametrize("args", [
    ["--since", "yesterday"], ["--until", "2024-13-01"], ["--since", "5y"],
    ["--direction", "up"], ["--format", "xml"], ["--prefix", "a/b"],
])
def test_report_bad_input_exits_2(tmp_path, capsys, args):
    write_ledger(tmp_path, [row_stamped(utc(10), received="1")])
    code, out, err = report(capsys, tmp_path, *args)
    assert code == 2 and out == "" and len(err.splitlines()) == 1


# --- missing, damaged, empty --------------------------------------------------------------------

def test_empty_folder_is_a_report_without_results(tmp_path, capsys):
    code, out, err = report(capsys, tmp_path)
    assert (code, err) == (0, "")
    assert "no results" in out
    assert report_json(capsys, tmp_path)["summary"] is None


def test_missing_folder_exits_1(tmp_path, capsys):
    code, out, err = report(capsys, tmp_path / "nope")
    assert code == 1 and out == "" and "no such folder" in err and len(err.splitlines()) == 1


def test_missing_ledger_with_results_says_rebuild(tmp_path, capsys):
    (tmp_path / "20240301_100000_client.json").write_text("{}")
    code, out, err = report(capsys, tmp_path)
    assert code == 1 and "no ledger" in err and "--rebuild" in err


@pytest.mark.parametrize("damage", [
    "timestamp,run\n",
    ",".join(COLUMNS) + "\n" + "only,three,fields\n",
    ",".join(COLUMNS) + '\n"unterminated\0quote\n',
])
def test_damaged_ledger_says_so_and_rebuild_repairs_it(tmp_path, capsys, fake_iperf3, damage):
    folder = tmp_path / "r"
    assert run_script(CLIENT_SCRIPT, ["-c", "h", "-d", folder, "--iperf3",
                                      fake_iperf3(FAKE % (2, 2))]).returncode == 0
    good = read_ledger(folder)
    (folder / "results.csv").write_text(damage)
    code, out, err = report(capsys, folder)
    assert code == 1 and "damaged" in err and "--rebuild" in err and "Traceback" not in err
    code, out, err = report(capsys, folder, "--rebuild", "--format", "csv")
    assert code == 0 and "rebuilt" in err
    assert read_ledger(folder) == good


def test_text_report_with_only_failures(tmp_path, capsys):
    write_ledger(tmp_path, [row_stamped(utc(10), status="error", error="unable to connect"),
                            row_stamped(utc(10), direction="reverse", status="error",
                                        error="busy")])
    code, out, err = report(capsys, tmp_path)
    assert (code, err) == (0, "")
    assert "forward: 1 test, 0 ok, 1 failed (100.0%)" in out
    assert "unable to connect" in out and "busy" in out
    assert "received: median" not in out and "by hour of day" not in out


def test_text_report_for_a_person(tmp_path, capsys):
    rows = [row_stamped(utc(h), received=repr(9.5e8 - h * 1e7)) for h in range(24)]
    rows += [row_stamped(utc(3), direction="reverse", received="2.5e9"),
             row_stamped(utc(4), direction="reverse", status="error", error="server busy")]
    write_ledger(tmp_path, rows)
    code, out, err = report(capsys, tmp_path)
    assert (code, err) == (0, "")
    assert "period: 2024-03-01" in out
    assert "forward: 24 tests, 24 ok, 0 failed (0.0%)" in out
    assert "reverse: 2 tests, 1 ok, 1 failed (50.0%)" in out
    assert "950.0 Mbit/s" in out and "2.50 Gbit/s" in out
    hour_lines = [line for line in out.splitlines() if line.startswith("  23 ")]
    assert hour_lines and "720.0 Mbit/s" in hour_lines[0]
    assert "lowest runs" in out and "failed runs" in out and "server busy" in out


@pytest.mark.parametrize("fmt", ["text", "csv", "json"])
def test_report_into_head_does_not_crash(tmp_path, fmt):
    write_ledger(tmp_path, [row_stamped(utc(i % 24, i % 60, 1 + i % 28), received=str(i))
                            for i in range(30000)])
    proc = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$0" "$1" report -d "$2" --format "$3" | head -1',
         sys.executable, str(CLIENT_SCRIPT), str(tmp_path), fmt],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60)
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 1 and proc.stderr == ""


@pytest.mark.parametrize("fmt", ["text", "csv", "json"])
def test_report_into_a_closed_pipe_is_quiet(tmp_path, fmt):
    """The reader is gone before the first byte: every format meets the broken pipe (with
    `| head -1` a short text report may fit the pipe's buffer and never meet it)."""
    write_ledger(tmp_path, [row_stamped(utc(i % 24, 0, 1)) for i in range(50)])
    proc = subprocess.Popen([sys.executable, str(CLIENT_SCRIPT), "report", "-d", str(tmp_path),
                             "--format", fmt], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    proc.stdout.close()
    try:
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert err == ""


# --- rebuild ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_rebuild_equals_the_ledger_from_plain_gzipped_failed_and_corrupt_files(
        tmp_path, capsys, fake_iperf3):
    folder = tmp_path / "r"
    big = fake_iperf3(FAKE % (30, 60))  # large documents: the fast path reads them
    small = fake_iperf3(FAKE % (1, 1))
    failing = fake_iperf3('print(json.dumps({"start": {}, "end": {}, "error": "busy, x"}))')
    for extra in ([], ["--compress"]):
        for fake in (big, small, failing):
            run_script(CLIENT_SCRIPT, ["-c", "h", "-d", folder, "--iperf3", fake, "--retries",
                                       "0", "--prefix", "p."] + extra)
    assert run_script(CLIENT_SCRIPT, ["-c", "h", "-d", folder, "--iperf3", tmp_path / "none",
                                      "--retries", "0"]).returncode == 1
    original = read_ledger(folder)
    assert len(original) == 14
    assert sum(r["file"].endswith(".gz") for r in original) == 6
    assert max(os.path.getsize(str(folder / r["file"])) for r in original) > (
        iperf_client.QUICK_HEAD + iperf_client.QUICK_TAIL)
    os.unlink(str(folder / "results.csv"))
    (folder / "p.20240101_000000_client.json").write_text('{"start": {"conn')
    (folder / "p.20240101_000000_server.json.gz").write_bytes(b"not gzip at all")
    (folder / "20240102_000000_server.json").write_text("[1, 2]")
    code, out, err = report(capsys, folder, "--rebuild", "--format", "csv")
    assert code == 0 and "rebuilt" in err
    rebuilt = read_ledger(folder)
    assert list(csv.DictReader(out.splitlines())) == rebuilt
    corrupt = [r for r in rebuilt if r["error"].startswith("unreadable result: ")]
    assert sorted(r["file"] for r in corrupt) == [
        "20240102_000000_server.json", "p.20240101_000000_client.json",
        "p.20240101_000000_server.json.gz"]
    assert [(r["direction"], r["run"], r["prefix"], r["status"]) for r in corrupt] == [
        ("forward", "20240101_000000", "p.", "error"),
        ("reverse", "20240101_000000", "p.", "error"),
        ("reverse", "20240102_000000", "", "error")]
    assert corrupt[0]["timestamp"] == iperf_client.iso_time(
        time.mktime((2024, 1, 1, 0, 0, 0, 0, 0, -1)))
    assert [r for r in rebuilt if r not in corrupt] == original  # row for row


def test_quick_path_agrees_with_a_full_parse(tmp_path):
    doc = {"continuous_iperf": {"run": "20240101_000000", "direction": "forward", "start": 5},
           "start": {"timestamp": {"timesecs": 1704067200}, "test_start": {"reverse": 0}},
           "intervals": [{"sum": {"end": float(i), "bits_per_second": 1.0}}
                         for i in range(20000)],
           "end": {"sum_sent": {"end": 60, "bits_per_second": 5.5, "retransmits": 2},
                   "sum_received": {"end": 60, "bits_per_second": 4.25}},
           "error": "interrupted by SIGTERM; \"quoted\""}
    data = iperf_client.encode_result(doc)
    quick = iperf_client.quick_document(data[:16384], data[-131072:])
    assert quick["end"] == doc["end"] and quick["error"] == doc["error"]
    assert quick["continuous_iperf"] == doc["continuous_iperf"]
    path = tmp_path / "20240101_000000_client.json"
    path.write_bytes(data)
    assert iperf_client.read_result_file(str(path)) == iperf_client.ledger_row(doc, path.name)
    # Unsure: something after "end" other than "error" -> None, and the full parse decides.
    doc["zz"] = 1
    data = iperf_client.encode_result(doc)
    assert iperf_client.quick_document(data[:16384], data[-131072:]) is None
    assert iperf_client.quick_document(b'{"start": {}}', b'{"start": {}}') is None


def test_rebuild_reads_files_without_metadata(tmp_path, capsys):
    legacy = {"start": {"connecting_to": {"host": "192.0.2.9", "port": 5202},
                        "timestamp": {"timesecs": 1704067260},
                        "test_start": {"num_streams": 30, "duration": 60, "reverse": 1}},
              "intervals": [], "end": {"sum_sent": {"bits_per_second": 10.5, "retransmits": 1},
                                       "sum_received": {"bits_per_second": 9.5}}}
    # The original scripts' names: the reverse test was "_server"; here its name says forward
    # (client) to show that iperf3's own "reverse" key wins over the name.
    (tmp_path / "CHANGE_TO_SUFFIX20240101_000100_client.json").write_text(
        json.dumps(legacy, indent="\t"))
    (tmp_path / "x20240101_000200_server.json").write_text('{"error": "old failure"}')
    code, out, err = report(capsys, tmp_path, "--rebuild", "--format", "csv")
    assert code == 0
    first, second = read_ledger(tmp_path)
    assert (first["direction"], first["server"], first["port"], first["streams"],
            first["duration"], first["prefix"], first["run"], first["received_bps"],
            first["timestamp"]) == (
        "reverse", "192.0.2.9", "5202", "30", "60", "CHANGE_TO_SUFFIX", "20240101_000100",
        "9.5", iperf_client.iso_time(1704067260))
    assert (second["direction"], second["status"], second["error"], second["timestamp"]) == (
        "reverse", "error", "old failure",
        iperf_client.iso_time(time.mktime((2024, 1, 1, 0, 2, 0, 0, 0, -1))))


# --- storage: --compress and --keep-days --------------------------------------------------------

def test_compress_writes_gzipped_json(tmp_path, fake_iperf3):
    proc = run_script(CLIENT_SCRIPT, ["-c", "h", "-d", tmp_path, "--compress",
                                      "--iperf3", fake_iperf3(FAKE % (30, 60))])
    assert (proc.returncode, proc.stderr) == (0, "")
    rows = read_ledger(tmp_path)
    assert [r["file"].split("_", 2)[2] for r in rows] == ["client.json.gz", "server.json.gz"]
    for r in rows:
        raw = (tmp_path / r["file"]).read_bytes()
        doc = json.loads(gzip.decompress(raw))
        assert float(r["received_bps"]) == doc["end"]["sum_received"]["bits_per_second"]
        assert len(gzip.decompress(raw)) > 10 * len(raw)
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")]


def test_keep_days_deletes_old_raw_files_and_keeps_rows(tmp_path, capsys, fake_iperf3):
    old_ts = time.strftime("%Y%m%d_%H%M%S", time.localtime(time.time() - 40 * 86400))
    recent_ts = time.strftime("%Y%m%d_%H%M%S", time.localtime(time.time() - 20 * 86400))
    old = ["p.%s%s" % (old_ts, suffix)
           for suffix in ("_client.json", "_server.json.gz", "_iperf_mon.log")]
    kept = ["p.%s_client.json" % recent_ts, "q.%s_client.json" % old_ts,
            "%s_client.json" % old_ts, "p.%s_notes.txt" % old_ts]
    for name in old + kept:
        (tmp_path / name).write_text("{}")
    old_rows = [row_stamped(iperf_client.iso_time(time.time() - 40 * 86400), prefix="p.",
                            run=old_ts, received="5", file=old[0])]
    write_ledger(tmp_path, old_rows)
    proc = run_script(CLIENT_SCRIPT, ["-c", "h", "-d", tmp_path, "--prefix", "p.",
                                      "--keep-days", "30", "--iperf3", fake_iperf3(FAKE % (1, 1))])
    assert (proc.returncode, proc.stderr) == (0, "")
    present = set(os.listdir(str(tmp_path)))
    assert not present & set(old)
    assert set(kept) <= present
    assert len([n for n in present if n.startswith("p.") and n.endswith(".json")]) == 3
    rows = read_ledger(tmp_path)
    assert rows[0] == old_rows[0] and len(rows) == 3
    # The rebuild keeps the rows whose raw files are gone.
    for name in kept:
        os.unlink(str(tmp_path / name))
    code, out, err = report(capsys, tmp_path, "--rebuild", "--prefix", "p.", "--format", "csv")
    assert code == 0 and read_ledger(tmp_path) == rows


@pytest.mark.parametrize("text, status, error", [
    ("[" * 100000 + "]" * 100000, "error", "unreadable result: "),
    # No figures is no success, whatever else the file says (iperf3 3.9 writes such files).
    ('{"continuous_iperf": {"start": true, "run": 5}, "end": {}}', "error",
     "iperf3 reported no result (exit ?)"),
    ('{"start": {"timestamp": {"timesecs": 1e400}}, "end": {"sum_received": '
     '{"bits_per_second": NaN}}}', "error", "iperf3 reported no result"),
    ('{"end": {"sum_sent": {"bits_per_second": NaN}, "sum_received": '
     '{"bits_per_second": NaN}}}', "error", "iperf3 reported no result"),
    ("\xff\xfe not utf-8", "error", "unreadable result: "),
    ("", "error", "unreadable result: "),
])
def test_hostile_files_become_rows_not_crashes(tmp_path, capsys, text, status, error):
    (tmp_path / "20240101_000000_server.json").write_bytes(text.encode("latin-1"))
    code, out, err = report(capsys, tmp_path, "--rebuild")
    assert code == 0 and "Traceback" not in err
    (only,) = read_ledger(tmp_path)
    assert (only["status"], only["error"][:len(error)], only["direction"]) == (
        status, error, "reverse")
    assert only["timestamp"] == iperf_client.iso_time(
        time.mktime((2024, 1, 1, 0, 0, 0, 0, 0, -1)))
    assert report_json(capsys, tmp_path)["summary"]["reverse"]["median_bps"] is None


def test_rebuild_waits_for_a_run_in_progress(tmp_path):
    write_ledger(tmp_path, [row_stamped(utc(10), received="1")])
    (tmp_path / "20240301_100000_client.json").write_text('{"error": "x"}')
    fd = os.open(str(tmp_path / ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a run in progress
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT_SCRIPT), "report", "-d", str(tmp_path), "--rebuild"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True)
    try:
        first = proc.stderr.readline()
        assert "waiting for the run in progress" in first
        assert proc.poll() is None
        assert read_ledger(tmp_path)[0]["status"] == "ok"  # untouched while the run holds it
    finally:
        os.close(fd)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "rebuilt" in err
    assert read_ledger(tmp_path)[0]["status"] == "error"


# --- the ledger is read and salvaged by its header, with every row kept ---------------------------

def runs_with_a_fake(tmp_path, fake_iperf3, count=2):
    """A results folder of `count` real runs (a fake iperf3 printing a fixed result); returns
    it with its ledger's text."""
    fake = fake_iperf3(FAKE_RESULT + "\nprint(json.dumps(doc))\n")
    folder = tmp_path / "r"
    for _ in range(count):
        done = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", folder, "--iperf3", fake])
        assert done.returncode == 0, done.stderr
    return folder


def ledger_lines(folder):
    return (folder / "results.csv").read_text().splitlines()


def rebuild(folder):
    return run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--rebuild", "--format", "csv"])


def test_a_last_line_cut_inside_the_file_column_is_no_row_at(tmp_path, fake_iperf3):
    folder = runs_with_a_fake(tmp_path, fake_iperf3)
    whole = ledger_lines(folder)
    (folder / "results.csv").write_text("\n".join(whole)[:-8])  # "..._server.json" cut
    done = rebuild(folder)
    assert done.returncode == 0, done.stderr
    assert ledger_lines(folder) == whole  # each test once: the cut row left, the real one read


def test_a_run_after_a_cut_line_removes_it_and_keeps_the_rest(tmp_path, fake_iperf3):
    folder = runs_with_a_fake(tmp_path, fake_iperf3, count=1)
    whole = ledger_lines(folder)
    (folder / "results.csv").write_text("\n".join(whole)[:-8])
    folder = runs_with_a_fake(tmp_path, fake_iperf3, count=1)
    lines = ledger_lines(folder)
    assert lines[:2] == whole[:2] and len(lines) == 4
    assert all(row[iperf_client.Col.FILE].endswith((".json", ".json.gz"))
               for row in csv.reader(lines[1:]))
    assert any("cut short" in path.read_text() for path in folder.glob("*_iperf_mon.log"))
    assert rebuild(folder).returncode == 0
    assert len(ledger_lines(folder)) == 5  # the cut test's row comes back from its file


def test_a_file_and_its_gzip_twin_are_one_test(tmp_path, fake_iperf3):
    folder = runs_with_a_fake(tmp_path, fake_iperf3, count=1)
    whole = ledger_lines(folder)
    for path in folder.glob("*.json"):
        (folder / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))  # gzip -k
    assert rebuild(folder).returncode == 0
    assert ledger_lines(folder) == whole


def test_a_reordered_header_puts_the_figures_in_their_columns(tmp_path, fake_iperf3):
    folder = runs_with_a_fake(tmp_path, fake_iperf3, count=1)
    with open(str(folder / "results.csv"), newline="") as handle:
        table = list(csv.reader(handle))
    sent, received = table[0].index("sent_bps"), table[0].index("received_bps")
    for row in table:  # swap the two columns, header included: the same ledger, reordered
        row[sent], row[received] = row[received], row[sent]
    with open(str(folder / "results.csv"), "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(table)
    done = run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--format", "json", "--runs"])
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["runs"]
    assert [(run["sent_bps"], run["received_bps"]) for run in runs] == [
        (1000.5, 900.25), (1001.5, 901.25)]
    # A run continues the ledger in its own order.
    runs_with_a_fake(tmp_path, fake_iperf3, count=1)
    with open(str(folder / "results.csv"), newline="") as handle:
        appended = list(csv.DictReader(handle))[-1]
    assert (appended["sent_bps"], appended["received_bps"]) == ("1001.5", "901.25")


@pytest.mark.slow
def test_a_newer_versions_extra_column_keeps_every_row_and_its_cells(tmp_path, fake_iperf3):
    folder = runs_with_a_fake(tmp_path, fake_iperf3, count=2)
    lines = ledger_lines(folder)
    (folder / "results.csv").write_text("\n".join(
        [lines[0] + ",rtt_ms"] + [line + ",%d.5" % n for n, line in enumerate(lines[1:])]) + "\n")
    runs_with_a_fake(tmp_path, fake_iperf3, count=1)  # a run of ours appends to it
    done = rebuild(folder)
    assert done.returncode == 0 and "damaged" not in done.stderr, done.stderr
    assert not list(folder.glob("results.csv.damaged-*"))
    with open(str(folder / "results.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    assert [row["rtt_ms"] for row in rows] == ["0.5", "1.5", "2.5", "3.5", "", ""]
    assert all(row["received_bps"] for row in rows)


def test_damaged_copies_never_overwrite_each_other(tmp_path):
    ledger = tmp_path / "results.csv"
    ledger.write_text("first")
    first = iperf_client.keep_damaged_copy(str(ledger))
    ledger.write_text("second")
    second = iperf_client.keep_damaged_copy(str(ledger))
    assert first != second
    assert (open(first).read(), open(second).read()) == ("first", "second")


def test_sigterm_during_a_rebuild_stops_it_in_one_line(tmp_path):
    """The rebuild reads files in worker processes: none may print a traceback."""
    # About 150 KB of numbers in each file, which is parsed whole (no metadata of ours first).
    padding = [{"start": n + 0.25, "bytes": n * 1000, "sender": True} for n in range(3000)]
    document = {"start": {"timestamp": {"timesecs": "TIMESECS"}},
                "intervals": padding,
                "end": {"sum_sent": {"bits_per_second": 1e6},
                        "sum_received": {"bits_per_second": 9e5}}}
    text = json.dumps(document)  # once: 600 times took 4 s of CPU from the tests beside it
    for index in range(600):
        name = "20240101_%06d_client.json" % index
        (tmp_path / name).write_text(text.replace('"TIMESECS"', str(1700000000 + index)))
    proc = subprocess.Popen([sys.executable, str(CLIENT_SCRIPT), "report", "-d", str(tmp_path),
                             "--rebuild"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)

    def workers():
        with open("/proc/%d/task/%d/children" % (proc.pid, proc.pid)) as handle:
            return handle.read().split()
    assert wait_until(lambda: proc.poll() is not None or len(workers()) >= 2, timeout=30)
    time.sleep(0.2)  # the workers are reading files now
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr)
    assert stderr.strip().splitlines() == ["iperf_client.py: stopped by SIGTERM"]
    assert not [name for name in os.listdir(str(tmp_path)) if name.endswith(".tmp")]


# --- rebuilding the ledger -----------------------------------------------------------------

def write_raw_ledger(path, header, rows, extra_lines=()):
    """A ledger file as it may be found: any header, rows and stray lines, as given."""
    lines = [",".join(header)] + [",".join(row) for row in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage", ["header", "bad-line"])
def test_rebuild_salvages_rows_whose_files_are_gone(tmp_path, damage):
    """After --keep-days the ledger's old rows exist nowhere else: damage must not cost them."""
    rows = old_rows(6)
    header = list(iperf_client.BASE_COLUMNS)  # a ledger of version 2.1
    if damage == "header":
        header[0] = "tmestamp"  # misspelled: the header no longer says where "timestamp" is
    ledger = tmp_path / "results.csv"
    write_raw_ledger(ledger, header, rows, ["a,half,row"] if damage == "bad-line" else [])
    before = ledger.read_text()
    done = rebuild(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    with open(str(ledger), newline="") as handle:
        kept = list(csv.reader(handle))[1:]
    assert kept == [row + [""] * len(iperf_client.ADDED_COLUMNS) for row in rows]
    saved = [name for name in os.listdir(str(tmp_path)) if name.startswith("results.csv.damaged-")]
    assert len(saved) == 1 and (tmp_path / saved[0]).read_text() == before
    dropped = 1 if damage == "bad-line" else 0
    assert "damaged (%d line" % dropped in done.stderr


def test_rebuild_keeps_the_zone_the_tests_ran_in(tmp_path, fake_iperf3):
    """cron and a person's shell may have different TZ: the rebuilt ledger must not change."""
    fake = fake_iperf3("""
        print(json.dumps({"start": {"timestamp": {"timesecs": 1767225600}},
                          "end": {"sum_sent": {"bits_per_second": 2.0},
                                  "sum_received": {"bits_per_second": 1.0}}}))
    """)
    env = dict(os.environ, TZ="XST-5:30")  # POSIX zones: no tzdata needed
    done = subprocess.run([sys.executable, str(CLIENT_SCRIPT), "--server", "127.0.0.1", "-t", "1",
                           "-P", "1", "-d", str(tmp_path), "--iperf3", str(fake)], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ledger = tmp_path / "results.csv"
    original = ledger.read_text()
    assert "2026-01-01T05:30:00+05:30" in original
    env["TZ"] = "YST+5"
    done = subprocess.run([sys.executable, str(CLIENT_SCRIPT), "report", "-d", str(tmp_path),
                           "--rebuild", "--format", "csv"], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ledger.read_text() == original
