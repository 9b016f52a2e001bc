"""The report at a fleet's scale: its figures, read in one pass, proven exact against figures
computed here independently; one JSON shape for one link and many; the display of skipped runs,
unknown servers and the latency grade."""

import csv
import json
import random
import statistics

import pytest

from conftest import CLIENT_SCRIPT, run_script

import iperf_client

COLUMNS = list(iperf_client.LEDGER_COLUMNS)
START = 1767225600  # 2026-01-01T00:00:00Z


def stamp(moment):
    return iperf_client.iso_time(moment, 0)  # UTC: the hour of day is the ledger's own


def generated_rows(rng, runs=900, servers=("192.0.2.10", "192.0.2.11")):
    """Runs every 17 minutes over ten days: two TCP targets (RTT cells, empty in some reverse
    tests), one UDP target, 3% failed tests, skipped runs, unordered figures."""
    rows = []
    for index in range(runs):
        moment = START + index * 1020
        run = iperf_client.time.strftime("%Y%m%d_%H%M%S", iperf_client.time.gmtime(moment))
        if rng.random() < 0.01:
            rows.append(dict(timestamp=stamp(moment), run=run, direction="forward",
                             status="skipped", error="another run held the results folder",
                             client="host"))
            continue
        for number, (server, protocol) in enumerate(
                [(server, "tcp") for server in servers] + [(servers[0], "udp")]):
            for offset, direction in ((0, "forward"), (70, "reverse")):
                rows.append(made_row(rng, moment + 150 * number + offset, run, server,
                                     protocol, direction))
    return rows


def made_row(rng, moment, run, server, protocol, direction):
    row = dict(timestamp=stamp(moment), run=run, direction=direction, server=server,
               port="5201", streams="4", duration="10", attempts="1", client="host",
               protocol=protocol, label=server,
               file="%s_%s_%s.json" % (run, server.replace(".", "-") + protocol,
                                       "client" if direction == "forward" else "server"))
    if rng.random() < 0.03:
        row.update(status="error", error=rng.choice(["refused", "busy", "timed out"]))
        return row
    received = rng.uniform(1e8, 9e8) * (0.6 if 18 <= int(row["timestamp"][11:13]) < 23 else 1)
    row.update(status="ok", received_bps=repr(received), sent_bps=repr(received * 1.01))
    if protocol == "tcp":
        row["retransmits"] = str(rng.randint(0, 50))
        if direction == "forward" or rng.random() < 0.7:
            base = rng.uniform(5, 15)
            row.update(min_rtt_ms=repr(base), mean_rtt_ms=repr(base + rng.uniform(0, 80)))
    else:
        packets = rng.randint(800, 1000)
        row.update(jitter_ms=repr(rng.uniform(0.01, 2)), lost_packets=str(rng.randint(0, 9)),
                   packets=str(packets), lost_percent=repr(rng.uniform(0, 1)))
    return row


def write(folder, rows, columns=COLUMNS):
    with open(str(folder / "results.csv"), "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[row.get(column, "") for column in columns] for row in rows])


def report_json(folder, *args):
    done = run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--format", "json"] + list(args))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return json.loads(done.stdout)


def quantile(values, fraction):
    cuts = statistics.quantiles(sorted(values), n=20, method="inclusive")
    return {0.05: cuts[0], 0.95: cuts[18]}[fraction]


def expected(rows, server, protocol, direction):
    """The figures of one link and direction, computed here from the rows."""
    mine = [row for row in rows if row.get("server") == server and row.get(
        "protocol") == protocol and row["direction"] == direction]
    ok = [row for row in mine if row["status"] == "ok"]
    received = [float(row["received_bps"]) for row in ok]
    figures = {"count": len(mine), "ok": len(ok), "failed": len(mine) - len(ok),
               "median_bps": statistics.median(received), "min_bps": min(received),
               "max_bps": max(received), "p5_bps": quantile(received, 0.05),
               "p95_bps": quantile(received, 0.95)}
    hours = {}
    for row in ok:
        hours.setdefault(row["timestamp"][11:13], []).append(row)
    figures["by_hour"] = {hour: statistics.median(float(r["received_bps"]) for r in group)
                          for hour, group in hours.items()}
    if protocol == "tcp":
        rtts = [float(row["mean_rtt_ms"]) for row in ok if row.get("mean_rtt_ms")]
        figures["median_rtt_ms"] = statistics.median(rtts)
        figures["median_min_rtt_ms"] = statistics.median(
            float(row["min_rtt_ms"]) for row in ok if row.get("min_rtt_ms"))
        figures["retransmits"] = sum(int(row["retransmits"]) for row in ok)
        figures["rtt_by_hour"] = {hour: statistics.median(
            float(r["mean_rtt_ms"]) for r in group if r.get("mean_rtt_ms"))
            for hour, group in hours.items() if any(r.get("mean_rtt_ms") for r in group)}
    else:
        figures["median_jitter_ms"] = statistics.median(float(row["jitter_ms"]) for row in ok)
        figures["median_lost_percent"] = statistics.median(
            float(row["lost_percent"]) for row in ok)
        figures["lost_percent"] = 100.0 * sum(int(row["lost_packets"]) for row in ok) / sum(
            int(row["packets"]) for row in ok)
    figures["bytes"] = sum(float(row["sent_bps"]) * 10 for row in ok) / 8
    return figures


def test_figures_are_exact_per_link_and_direction(tmp_path):
    rows = generated_rows(random.Random(7))
    write(tmp_path, rows)
    data = report_json(tmp_path)
    links = {(link["server"], link["protocol"]): link for link in data["links"]}
    assert sorted(links) == [("", "tcp"), ("192.0.2.10", "tcp"), ("192.0.2.10", "udp"),
                             ("192.0.2.11", "tcp")]
    # A skipped run names no target: its row is a link of its own, "server unknown".
    unknown = links.pop(("", "tcp"))
    assert unknown["name"] == "server unknown"
    assert unknown["summary"]["forward"]["skipped"] == sum(
        1 for row in rows if row["status"] == "skipped") > 0
    for (server, protocol), link in links.items():
        for direction in ("forward", "reverse"):
            want, got = expected(rows, server, protocol, direction), link["summary"][direction]
            for key in ("count", "ok", "failed", "min_bps", "max_bps", "retransmits"):
                if key in want:
                    assert got[key] == want[key], (server, protocol, direction, key)
            # Every test counts: the same figures but for the last bit of an interpolation
            # (statistics computes a weighted mean, the report a step from the lower rank).
            for key in ("median_bps", "p5_bps", "p95_bps", "median_rtt_ms", "median_min_rtt_ms",
                        "median_jitter_ms", "median_lost_percent", "lost_percent", "bytes"):
                if key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-14, abs=0), key
            hours = link["by_hour"][direction]
            assert {hour: figures["median_bps"] for hour, figures in hours.items()} == (
                pytest.approx(want["by_hour"], rel=1e-14, abs=0))
            assert len(hours) == 24
            if protocol == "tcp":
                assert {hour: figures["median_rtt_ms"] for hour, figures in hours.items()
                        if figures["rtt_tests"]} == pytest.approx(want["rtt_by_hour"],
                                                                  rel=1e-14, abs=0)
                assert got["latency_grade"] == iperf_client.latency_grade(
                    got["median_rtt_ms"] - got["median_min_rtt_ms"])


def test_a_second_target_changes_no_key_a_consumer_reads(tmp_path):
    rng = random.Random(3)
    one = generated_rows(rng, runs=40, servers=("192.0.2.10",))
    one = [row for row in one if row.get("protocol") != "udp" and row["status"] != "skipped"]
    write(tmp_path, one)
    before = report_json(tmp_path)
    two = one + [dict(row, server="192.0.2.99", label="new",
                      file=row["file"].replace("_client", "_new_client")) for row in one]
    write(tmp_path, two)
    after = report_json(tmp_path)

    def keys(document):
        link = document["links"][0]
        return (sorted(document), sorted(link), sorted(link["summary"]),
                sorted(link["summary"]["forward"]), sorted(link["by_hour"]))
    assert keys(before) == keys(after)
    assert len(before["links"]) == 1 and len(after["links"]) == 2
    first = [link for link in after["links"] if link["server"] == "192.0.2.10"][0]
    assert first["summary"] == before["links"][0]["summary"]
    assert first["by_hour"] == before["links"][0]["by_hour"]
    assert "runs" not in before  # the rows only with --runs
    with_runs = report_json(tmp_path, "--runs", "--server", "192.0.2.99")
    assert [run["server"] for run in with_runs["runs"]] == ["192.0.2.99"] * len(one)
    assert sorted(with_runs) == ["links", "runs"]


def test_old_ledger_cut_last_line_and_selectors_in_one_pass(tmp_path):
    rows = [row for row in generated_rows(random.Random(5), runs=60)
            if row.get("protocol") != "udp"]
    old = list(iperf_client.BASE_COLUMNS)  # a 2.1 ledger: 15 columns, no client or protocol
    write(tmp_path, rows, old)
    with open(str(tmp_path / "results.csv"), "a") as handle:
        handle.write(stamp(START + 10 ** 6) + ",20260112_000000,,forw")  # a run appending it
    data = report_json(tmp_path, "--server", "192.0.2.11", "--direction", "reverse")
    assert [(link["server"], link["client"], link["protocol"]) for link in data["links"]] == [
        ("192.0.2.11", "", "tcp")]
    want = expected([dict(row, protocol="tcp") for row in rows], "192.0.2.11", "tcp",
                    "reverse")
    got = data["links"][0]["summary"]
    assert list(got) == ["reverse"]
    assert (got["reverse"]["count"], got["reverse"]["median_bps"]) == (
        want["count"], pytest.approx(want["median_bps"], rel=1e-14, abs=0))
    since = report_json(tmp_path, "--since", stamp(START + 5 * 3600), "--until",
                        stamp(START + 9 * 3600), "--server", "192.0.2.10")
    inside = [row for row in rows if row.get("server") == "192.0.2.10"
              and stamp(START + 5 * 3600) <= row["timestamp"] < stamp(START + 9 * 3600)]
    assert sum(stats["count"] for stats in since["links"][0]["summary"].values()) == len(inside)


def test_skipped_runs_told_one_way(tmp_path):
    skipped = dict(timestamp=stamp(START), run="20260101_000000", direction="forward",
                   status="skipped", error="another run held the results folder",
                   client="host")
    write(tmp_path, [skipped])
    text = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path]).stdout
    assert "forward: 0 tests, 0 ok, 0 failed (0.0%), and 1 run skipped" in text
    assert "server unknown" in text and " : " not in text and "SKIPPED" in text
    assert "by hour of day" not in text
    summary = report_json(tmp_path)["links"][0]
    assert summary["name"] == "server unknown" and summary["latest_status"] == "skipped"
    assert (summary["summary"]["forward"]["count"], summary["summary"]["forward"]["skipped"]) == (
        0, 1)


def test_latency_grade_in_text_json_and_html(tmp_path):
    rows = [dict(made_row(random.Random(1), START + 600 * i, "20260101_%06d" % i,
                          "192.0.2.10", "tcp", "forward"), min_rtt_ms="10.0",
                 mean_rtt_ms="50.0") for i in range(4)]
    rows = [dict(row, status="ok", error="") for row in rows]
    for row in rows:
        row.setdefault("received_bps", "9e8")
        row.setdefault("sent_bps", "9e8")
        row.setdefault("retransmits", "1")
    write(tmp_path, rows)
    stats = report_json(tmp_path)["links"][0]["summary"]["forward"]
    assert (stats["added_delay_ms"], stats["latency_grade"]) == (40.0, "B")
    text = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path]).stdout
    assert "added by the load 40.0 ms, grade (approx.) B" in text
    page = tmp_path / "r.html"
    assert run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--html", page]).returncode == 0
    html = page.read_text()
    assert "grade (approx.)</th>" in html and "<td>B</td>" in html


def test_a_long_period_is_drawn_as_buckets_with_bands(tmp_path):
    rows = []
    for index in range(6000):  # every 30 minutes for 125 days: a daily ramp 900 -> 613 Mbit/s
        moment = START + index * 1800
        hour = (moment % 86400) / 3600.0
        rows.append(dict(made_row(random.Random(index), moment, "20260101_000000",
                                  "192.0.2.10", "tcp", "forward"), status="ok", error="",
                         received_bps=repr(900e6 - 287e6 * hour / 24), sent_bps="9e8",
                         retransmits="0"))
    write(tmp_path, rows)
    page = tmp_path / "r.html"
    assert run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--html", page]).returncode == 0
    html = page.read_text()
    assert html.count('<polygon class="band forward"') >= 1
    assert "shaded: p5-p95 of a slot" in html
    points = [float(pair.split(",")[1]) for line in html.split('<polyline class="series '
                                                               'forward"')[1:2]
              for pair in line.split('points="')[1].split('"')[0].split()]
    assert 100 < len(points) <= iperf_client.MAX_POINTS // 2 + 1
    # The band shows the daily range, 900 down to 613 Mbit/s: 28.7% of the axis (0 to 1000
    # Mbit/s over 222 pixels), 64 pixels; picked samples hid it.
    band = [float(pair.split(",")[1]) for pair in html.split(
        '<polygon class="band forward"')[1].split('points="')[1].split('"')[0].split()]
    assert max(band) - min(band) > 50


def test_a_week_of_a_first_day_fits_the_axis_to_the_data(tmp_path):
    now = iperf_client.time.time()
    rows = [dict(made_row(random.Random(i), now - 3600 * (10 - i), "20260101_%06d" % i,
                          "192.0.2.10", "tcp", "forward"), status="ok", error="",
                 received_bps="9e8", sent_bps="9e8", retransmits="0") for i in range(10)]
    write(tmp_path, rows)
    page = tmp_path / "r.html"
    assert run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--since", "7d", "--html",
                                      page]).returncode == 0
    html = page.read_text()
    assert "The selected period starts" in html and "the first test in it is of" in html
    # The time axis spans the data (hours), not the week: its labels are times of day.
    axis = html.split('class="chart time-chart"')[1].split("</svg>")[0]
    assert ":00</text>" in axis
