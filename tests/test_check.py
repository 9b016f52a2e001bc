"""Tests of `report --check`, the Nagios/Icinga plugin: every state and exit code, stale and
missing data, wrong arguments, and one check of real iperf3 runs."""

import re
import time

import pytest

from conftest import CLIENT_SCRIPT, ledger_cells, paced, row_at, run_script, write_ledger

import iperf_client

PERF_RE = re.compile(r"^(forward|reverse)=(\d+|U);(\d+):;(\d+):$")


def runs(count=6, interval=300, forward=9.4e9, reverse=8.9e9, age=60, prefix=""):
    """`count` runs `interval` s apart, the last one `age` s ago; the figures of every run."""
    now = time.time()
    rows = []
    for index in range(count):
        moment = now - age - (count - 1 - index) * interval
        rows.append(row_at(moment, "forward", forward, prefix=prefix))
        rows.append(row_at(moment + 30, "reverse", reverse, prefix=prefix, run_at=moment))
    return rows


def check(capsys, folder, *args):
    """Run the check in-process: (exit code, status line, {direction: perfdata fields})."""
    code = iperf_client.main(["report", "-d", str(folder), "--check"] + list(args))
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 1, out
    perf = {}
    if " | " in lines[0]:
        for item in lines[0].split(" | ", 1)[1].split():
            match = PERF_RE.match(item)
            assert match, item
            perf[match.group(1)] = match.groups()[1:]
    return code, lines[0], perf


THRESHOLDS = ("--warn-below", "5000", "--crit-below", "1000")  # Mbit/s


def test_a_healthy_link_is_ok_with_perfdata_for_both_directions(tmp_path, capsys):
    rows = runs()
    write_ledger(tmp_path, rows)
    code, line, perf = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 0 and line.startswith("OK - ")
    assert "forward 9.40 Gbit/s" in line and "reverse 8.90 Gbit/s" in line
    assert perf == {"forward": ("9400000000", "5000000000", "1000000000"),
                    "reverse": ("8900000000", "5000000000", "1000000000")}
    assert list(perf) == ["forward", "reverse"]


@pytest.mark.parametrize("forward, reverse, code, state", [
    (4.2e9, 8.9e9, 1, "WARNING"),
    (9.4e9, 4.9999e9, 1, "WARNING"),
    (0.9e9, 8.9e9, 2, "CRITICAL"),
    (4.2e9, 0.5e9, 2, "CRITICAL"),  # the worst state wins
    (5e9, 5e9, 0, "OK"),  # "below" is strict: at the threshold is fine
])
def test_each_threshold_gives_its_state(tmp_path, capsys, forward, reverse, code, state):
    write_ledger(tmp_path, runs(forward=forward, reverse=reverse))
    found, line, perf = check(capsys, tmp_path, *THRESHOLDS)
    assert (found, line.split(" - ")[0]) == (code, state)
    assert perf["forward"][0] == "%d" % forward and perf["reverse"][0] == "%d" % reverse


def test_latest_failed_test_is_critical_even_after_good_ones(tmp_path, capsys):
    rows = runs()
    rows.append(row_at(time.time() - 20, "reverse", error="unable to connect | refused"))
    write_ledger(tmp_path, rows)
    code, line, perf = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 2 and line.startswith("CRITICAL - ")
    assert "reverse test failed" in line and "unable to connect / refused" in line
    assert perf["reverse"] == ("U", "5000000000", "1000000000")
    assert perf["forward"][0] == "9400000000"


def test_fractional_thresholds_in_mbit(tmp_path, capsys):
    write_ledger(tmp_path, runs(forward=600e3, reverse=400e3))
    code, line, perf = check(capsys, tmp_path, "--warn-below", "0.5", "--crit-below", "0.25")
    assert code == 1 and line.startswith("WARNING - reverse")  # the worst note first
    assert perf["forward"][1:] == ("500000", "250000")
    assert "reverse 400.0 kbit/s < 500.0 kbit/s" in line


def test_stale_results_are_critical(tmp_path, capsys):
    write_ledger(tmp_path, runs(age=40 * 60))  # runs every 5 minutes, the last 40 minutes ago
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 2 and "latest test 40.0 min old (max 15.0 min)" in line
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS, "--max-age", "45.5")
    assert code == 0, line


def test_default_max_age_is_three_usual_intervals(tmp_path, capsys):
    write_ledger(tmp_path, runs(interval=60, age=4 * 60))  # every minute, the last 4 min ago
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 2 and "(max 3.0 min)" in line
    write_ledger(tmp_path, runs(interval=1800, age=80 * 60))  # every 30 min, 80 min ago
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 0, line


def test_default_max_age_falls_back_to_15_minutes(tmp_path, capsys):
    write_ledger(tmp_path, runs(count=2, interval=60, age=14 * 60))
    assert check(capsys, tmp_path, *THRESHOLDS)[0] == 0
    write_ledger(tmp_path, runs(count=2, interval=60, age=16 * 60))
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 2 and "(max 15.0 min)" in line


def test_usual_interval_is_the_median_gap_per_prefix():
    rows = [[iperf_client.iso_time(t), "r%d" % t, prefix, "forward"]
            + [""] * (len(iperf_client.LEDGER_COLUMNS) - 4)
            for prefix, times in (("a", (0, 300, 600, 5000, 5300)), ("b", (10, 70, 130, 190)))
            for t in times]
    rows.sort(key=lambda r: r[0])
    assert iperf_client.usual_interval(rows) == 300  # a: gaps 300 300 4400 300; b: 60
    assert iperf_client.usual_interval(rows[:2]) is None
    assert iperf_client.default_max_age(rows[:2]) == 15.0


def test_no_results_is_unknown(tmp_path, capsys):
    code, line, perf = check(capsys, tmp_path, *THRESHOLDS)  # an empty folder
    assert code == 3 and line.startswith("UNKNOWN - no results") and perf == {}
    code, line, _ = check(capsys, tmp_path / "missing", *THRESHOLDS)
    assert code == 3 and line.startswith("UNKNOWN - ") and "no such folder" in line
    write_ledger(tmp_path, runs(prefix="a-"))
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS, "--prefix", "b-")
    assert code == 3 and line.startswith("UNKNOWN - no results") and "b-" in line
    assert check(capsys, tmp_path, *THRESHOLDS, "--prefix", "a-")[0] == 0
    assert check(capsys, tmp_path, *THRESHOLDS, "--since", "2h", "--until", "1h")[0] == 3


def test_damaged_ledger_is_unknown(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("not,a,ledger\n")
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 3 and line.startswith("UNKNOWN - ") and "--rebuild" in line


def test_a_direction_without_results_is_unknown(tmp_path, capsys):
    rows = [r for r in runs() if r["direction"] == "forward"]
    write_ledger(tmp_path, rows)
    code, line, perf = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 3 and line.startswith("UNKNOWN - ") and "reverse: no result" in line
    assert perf["reverse"][0] == "U" and perf["forward"][0] == "9400000000"
    code, line, perf = check(capsys, tmp_path, *THRESHOLDS, "--direction", "forward")
    assert code == 0 and list(perf) == ["forward"]
    write_ledger(tmp_path, [r for r in runs(forward=4e9) if r["direction"] == "forward"])
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 1 and line.startswith("WARNING")  # WARNING outranks UNKNOWN


@pytest.mark.parametrize("args, message", [
    ([], "--warn-below"),
    (["--warn-below", "5"], "--crit-below"),
    (["--crit-below", "5"], "--warn-below"),
    (["--warn-below", "5", "--crit-below", "10"], "warn must be above crit"),
    (["--warn-below", "fast", "--crit-below", "1"], "not a number of Mbit/s"),
    (["--warn-below", "5", "--crit-below", "-1"], "not a number of Mbit/s"),
    (["--warn-below", "nan", "--crit-below", "1"], "not a number of Mbit/s"),
    (["--warn-below", "5", "--crit-below", "1", "--max-age", "0"], "minutes > 0"),
    (["--warn-below", "5", "--crit-below", "1", "--max-age", "x"], "minutes > 0"),
    (["--warn-below", "5", "--crit-below", "1", "--html", "x.html"], "--html"),
    (["--warn-below", "5", "--crit-below", "1", "--since", "yesterday"], "neither an ISO"),
    (["--warn-below", "5", "--crit-below", "1", "--direction", "up"], "invalid choice"),
    (["--warn-below", "5", "--crit-below", "1", "--no-such-flag"], "unrecognized"),
])
def test_bad_arguments_are_unknown(tmp_path, capsys, args, message):
    write_ledger(tmp_path, runs())
    code, line, _ = check(capsys, tmp_path, *args)
    assert code == 3 and line.startswith("UNKNOWN - bad arguments: ") and message in line


def test_an_abbreviated_check_flag_is_still_a_plugin(tmp_path, capsys):
    code = iperf_client.main(["report", "-d", str(tmp_path), "--che", "--warn-below", "x"])
    out, err = capsys.readouterr()
    assert code == 3 and out.startswith("UNKNOWN - bad arguments: ") and err == ""


def test_thresholds_without_check_are_a_usage_error(tmp_path, capsys):
    assert iperf_client.main(["report", "-d", str(tmp_path), "--warn-below", "5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "go with --check" in err


@pytest.mark.slow
def test_check_of_real_runs_as_monitoring_runs_it(iperf3_server, tmp_path):
    args = ["--server", "127.0.0.1", "--port", iperf3_server.port, "-t", "1", "-P", "2",
            "-d", tmp_path, "--busy-wait", "0", "--timeout-margin", "5"]
    assert run_script(CLIENT_SCRIPT, paced(args)).returncode == 0
    done = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--check", "--warn-below",
                                      "1", "--crit-below", "0.5"])
    assert done.returncode == 0 and done.stderr == ""
    ledger = (tmp_path / "results.csv").read_text().splitlines()[1:]
    figures = ["%d" % round(float(line.split(",")[11])) for line in ledger]
    assert done.stdout.startswith("OK - ") and done.stdout.count("\n") == 1
    assert done.stdout.rstrip().endswith(
        "| forward=%s;1000000:;500000: reverse=%s;1000000:;500000:" % tuple(figures))
    huge = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--check", "--warn-below",
                                      "1e9", "--crit-below", "1e8"])
    assert huge.returncode == 2 and huge.stdout.startswith("CRITICAL - ")


# --- "latest" means the latest written ------------------------------------------------------------

def test_a_test_dated_in_the_future_does_not_hide_later_failures(tmp_path, capsys):
    """One run made while the clock was six days ahead, then failures at the right time."""
    now = time.time()
    rows = runs(count=4, age=1200)
    ahead = now + 6 * 86400
    rows += [row_at(ahead, "forward", 9.4e9), row_at(ahead + 30, "reverse", 8.9e9, run_at=ahead)]
    rows += [row_at(now - 120, "forward", error="unable to connect to server: refused"),
             row_at(now - 90, "reverse", error="unable to connect to server: refused",
                    run_at=now - 120)]
    write_ledger(tmp_path, rows)
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 2 and line.startswith("CRITICAL - "), line
    assert "forward test failed" in line and "reverse test failed" in line
    assert "dated in the future" in line
    report = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path])
    assert "in the future: a clock was off" in report.stdout


def test_check_reads_only_the_end_of_a_large_ledger(tmp_path, capsys):
    """The latest rows are found from the file's end; a damaged row far back does not matter
    (the full report would say the ledger needs a rebuild)."""
    rows = runs(count=3000, interval=300)
    write_ledger(tmp_path, rows)
    with open(str(tmp_path / "results.csv")) as handle:
        lines = handle.readlines()
    lines[5] = "a,damaged,line\n"
    (tmp_path / "results.csv").write_text("".join(lines))
    code, line, _ = check(capsys, tmp_path, *THRESHOLDS)
    assert code == 0 and line.startswith("OK - "), line
    tail, whole = iperf_client.read_ledger_tail(str(tmp_path / "results.csv"), 2000)
    assert len(tail) == 2000 and not whole
    assert tail == [ledger_cells(one) for one in rows[-2000:]]


# --- against the link's own normal (--drop-below, --rtt-rise) ---------------------------------

def history(steps, interval=300, rtt=None):
    """A week and a bit of runs, 5 minutes apart, ending now: forward received about 950
    Mbit/s (+-2 %), then `steps`, the latest tests' figures in Mbit/s, oldest first. With
    `rtt` (ms), the forward tests' RTT under load: 20 ms then `rtt` for the latest ones."""
    now, count = time.time(), 8 * 288
    figures = [950.0 * (0.98 + 0.04 * (index % 7) / 6.0) for index in range(count)] + steps
    rows = []
    for index, mbit in enumerate(figures):
        row = row_at(now - 60 - (len(figures) - 1 - index) * interval, "forward", mbit * 1e6)
        if rtt is not None:
            row["mean_rtt_ms"] = repr(rtt if index >= count else 20.0 + index % 3)
            row["min_rtt_ms"] = "10.0"
        rows.append(row)
    return rows


def relative(tmp_path, capsys, rows, *args):
    write_ledger(tmp_path, rows)
    code = iperf_client.main(["report", "-d", str(tmp_path), "--check", "--direction",
                              "forward"] + list(args))
    out, err = capsys.readouterr()
    assert err == "" and len(out.splitlines()) == 1, (out, err)
    return code, out.strip()


@pytest.mark.parametrize("low_tests, state", [(1, "OK"), (2, "OK"), (3, "CRITICAL"),
                                              (10, "CRITICAL")])
def test_a_step_down_of_40_percent_is_critical_after_3_tests(tmp_path, capsys, low_tests, state):
    code, line = relative(tmp_path, capsys, history([570.0] * low_tests), "--drop-below", "80,70")
    assert line.startswith(state + " - "), line
    assert code == iperf_client.CHECK_EXIT[state]
    # The line says what it compared with what.
    assert "7d baseline median 950.0 Mbit/s" in line or "7d baseline median 9" in line
    if low_tests >= 3:
        assert "median of the latest 3 570.0 Mbit/s = 60.0% of the 7d baseline" in line, line
    assert re.search(r"forward_throughput_vs_7d=\d+\.\d%;80:;70:", line), line


def test_a_single_dip_does_not_page_anyone(tmp_path, capsys):
    code, line = relative(tmp_path, capsys, history([950.0, 300.0, 950.0, 960.0]),
                          "--drop-below", "80,70")
    assert code == 0 and line.startswith("OK - "), line
    # Two dips in the latest three: the median is low, but not three in a row.
    code, line = relative(tmp_path, capsys, history([300.0, 950.0, 300.0, 300.0]),
                          "--drop-below", "80,70")
    assert code == 0, line
    code, line = relative(tmp_path, capsys, history([300.0, 950.0, 300.0, 300.0]),
                          "--drop-below", "80,70", "--consecutive", "2")
    assert code == 2, line


def test_a_baseline_window_without_data_is_unknown(tmp_path, capsys):
    rows = history([950.0] * 3)
    # Only tests older than the 7-day baseline, and the latest three.
    old = [row for row in rows[:-3] if iperf_client.row_time(row["timestamp"])
           < time.time() - 8 * 86400 + 3600]
    code, line = relative(tmp_path, capsys, old + rows[-3:], "--drop-below", "80")
    assert code == 3 and line.startswith("UNKNOWN - "), line
    assert "no baseline (0 ok tests in the 7d before the latest 3)" in line
    code, line = relative(tmp_path, capsys, old + rows[-3:], "--drop-below", "80",
                          "--baseline", "9d")
    assert code == 0, line


def test_rtt_rise_against_its_own_normal(tmp_path, capsys):
    code, line = relative(tmp_path, capsys, history([950.0] * 3, rtt=45.0), "--rtt-rise", "50,100")
    assert code == 2 and "forward RTT: median of the latest 3 45.0 ms" in line, line
    code, line = relative(tmp_path, capsys, history([950.0] * 3, rtt=35.0), "--rtt-rise", "50,100")
    assert code == 1, line
    code, line = relative(tmp_path, capsys, history([950.0] * 3, rtt=22.0), "--rtt-rise", "50,100")
    assert code == 0, line


@pytest.mark.parametrize("args, fragment", [
    (["--drop-below", "x"], "WARN[,CRIT]"),
    (["--drop-below", "80", "--baseline", "soon"], "--baseline"),
    (["--warn-loss", "5"], "go together"),
    (["--warn-loss", "5", "--crit-loss", "1"], "warn must be below crit"),
    (["--drop-below", "50,80"], "CRIT bound must be lower"),
    (["--rtt-rise", "100,50"], "CRIT bound must be higher"),
    ([], "--check needs thresholds"),
])
def test_bad_relative_arguments_are_unknown(tmp_path, capsys, args, fragment):
    code, line = relative(tmp_path, capsys, history([]), *args)
    assert code == 3 and fragment in line, line


def test_each_link_has_its_own_usual_interval_and_a_stale_one_is_not_forgotten(tmp_path, capsys):
    """One folder, one prefix, two links on their own schedules: a TCP line every 5 minutes
    (port 5201), an hourly one (port 5202, 40 minutes since its latest run: fine). A third link
    tested until 20 hours ago, whose rows lie more than 2,000 rows back, is judged stale."""
    now = time.time()
    rows = []
    for index in range(2400):  # every 30 s for 20 hours: 4,800 rows after the stale link's
        moment = now - 60 - (2399 - index) * 30
        rows.append(row_at(moment, "forward", 9e9))
        rows.append(row_at(moment + 10, "reverse", 9e9, run_at=moment))
    for index in range(6):
        moment = now - 2400 - (5 - index) * 3600
        rows.append(row_at(moment, "forward", 9e9, port=5202))
        rows.append(row_at(moment + 10, "reverse", 9e9, port=5202, run_at=moment))
    stale = []
    for index in range(4):
        moment = now - 72000 - (3 - index) * 300
        stale.append(row_at(moment, "forward", 9e9, port=5203))
        stale.append(row_at(moment + 10, "reverse", 9e9, port=5203, run_at=moment))
    rows = stale + sorted(rows, key=lambda row: row["timestamp"])
    write_ledger(tmp_path, rows)
    code = iperf_client.main(["report", "-d", str(tmp_path), "--check"] + list(THRESHOLDS))
    line = capsys.readouterr().out.strip()
    assert code == 2, line
    assert line.startswith("CRITICAL - 3 links: 1 CRITICAL, 2 OK; 192.0.2.7:5203: forward: "
                           "latest test 12"), line  # 1200 min old; max 15 min (its 5 min)
    assert "192.0.2.7:5202: OK" in line  # 40 min old, its runs hourly: max 180 min


def test_an_empty_ledger_is_no_results_for_the_check_too(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("")
    code = iperf_client.main(["report", "-d", str(tmp_path), "--check"] + list(THRESHOLDS))
    assert code == 3 and capsys.readouterr().out.startswith("UNKNOWN - no results")


def test_no_rtt_figures_at_all_is_no_reason_for_unknown(tmp_path, capsys):
    code, line = relative(tmp_path, capsys, history([950.0] * 3), "--rtt-rise", "50,100")
    assert code == 0 and "forward RTT: no figures to compare" in line, line
