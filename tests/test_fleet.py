"""A fleet on the monitoring it already runs (issue 22): the textfile's client and label labels,
its latency-under-load grade, and the shipped Prometheus rules and Grafana dashboard proven on
real processes: the client run as cron runs it into a textfile folder, node_exporter serving
that folder and Prometheus scraping it every second with docs/prometheus's rules loaded.

The Prometheus tests need `prometheus`, `promtool` and node_exporter (Debian's `prometheus` and
`prometheus-node-exporter`): without them they skip, or fail under REQUIRE_PROMETHEUS=1 (CI).
The test-bed test needs root and iproute2, like tests/test_netbed.py (REQUIRE_NETNS).
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import iperf_client
import netbed
from conftest import (CLIENT_SCRIPT, QUICK, ROOT, SERVER_SCRIPT, IperfServer, assert_quiet_success,
                      free_port, iperf3_path, kill_process, require, run_script, wait_until)

RULES_DIR = ROOT / "docs" / "prometheus"
RULES = RULES_DIR / "continuous-iperf.rules.yml"
RULE_TESTS = RULES_DIR / "continuous-iperf.rules.test.yml"
DASHBOARD = RULES_DIR / "dashboard.json"
CLIENT_NAME = "fleet-client"
GRADE_ORDER = [grade for grade, _ in iperf_client.LATENCY_GRADES] + [
    iperf_client.LATENCY_GRADE_WORST]


# --- the textfile: labels, the upgrade from 2.2, failures in a row, the grade -----------------

def ledger_row(direction="forward", status="ok", server="h", port="1", **cells):
    values = {"timestamp": iperf_client.iso_time(1700000000), "run": "x", "direction": direction,
              "server": server, "port": port, "status": status, "received_bps": "999",
              "sent_bps": "1000", "client": "me", "label": "paris", "mean_rtt_ms": "80.5",
              "min_rtt_ms": "30.5"}
    values.update(cells)
    return [values.get(column, "") for column in iperf_client.LEDGER_COLUMNS]


def samples(text):
    """[(name, labels, value)] of a textfile, through the official parser (every family a
    documented gauge)."""
    found = []
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge" and family.documentation, family.name
        found += [(s.name, s.labels, s.value) for s in family.samples]
    return found


def test_every_series_names_its_client_and_target_label():
    text = iperf_client.prometheus_text("", [ledger_row(), ledger_row("reverse", "error")])
    found = samples(text)
    assert len(found) > 5
    for name, labels, _ in found:
        assert (labels["client"], labels["label"], labels["server"], labels["port"]) == (
            "me", "paris", "h", "1"), name
        assert "protocol" not in labels  # TCP's series keep 2.2's labels otherwise
    udp = iperf_client.prometheus_text("", [ledger_row(protocol="udp", jitter_ms="0.5",
                                                       lost_percent="2", mean_rtt_ms="",
                                                       min_rtt_ms="")])
    assert all(labels["protocol"] == "udp" for _, labels, _ in samples(udp))


# A textfile written by version 2.2: no client, no label.
OLD_TEXTFILE = """\
# HELP iperf_success 1 when the latest test succeeded, 0 when it failed.
# TYPE iperf_success gauge
iperf_success{server="h",port="1",direction="forward"} 1
iperf_success{server="h",port="1",direction="reverse"} 1
iperf_success{server="h",port="1",protocol="udp",direction="forward"} 1
iperf_success{server="other",port="1",direction="forward"} 1
# HELP iperf_received_bits_per_second x
# TYPE iperf_received_bits_per_second gauge
iperf_received_bits_per_second{server="h",port="1",direction="forward"} 5
iperf_last_run_timestamp_seconds{server="h",port="1"} 1600000000.0
"""


def test_a_textfile_of_version_2_2_is_replaced_once_without_duplicates():
    """The upgrade replaces 2.2's unlabelled series of the tested link (both directions, even
    one this run did not test) and keeps those of links it does not test (another crontab line
    replaces them at its own run) and of the same server's UDP link."""
    text = iperf_client.prometheus_text(OLD_TEXTFILE, [ledger_row()])
    links = {}
    for name, labels, _ in samples(text):
        key = (name, labels["server"], labels.get("protocol"), labels.get("direction"))
        links.setdefault(key, []).append(labels.get("client"))
    assert links[("iperf_success", "h", None, "forward")] == ["me"]
    assert ("iperf_success", "h", None, "reverse") not in links
    assert links[("iperf_received_bits_per_second", "h", None, "forward")] == ["me"]
    assert links[("iperf_last_run_timestamp_seconds", "h", None, None)] == ["me"]
    assert links[("iperf_success", "h", "udp", "forward")] == [None]
    assert links[("iperf_success", "other", None, "forward")] == [None]
    assert iperf_client.prometheus_text(text, [ledger_row()]) == text  # once only


def consecutive(text):
    return {labels["direction"]: value for name, labels, value in samples(text)
            if name == "iperf_consecutive_failures"}


def test_failures_in_a_row_count_up_per_link_and_reset_on_a_success():
    text = ""
    for _ in range(3):
        text = iperf_client.prometheus_text(text, [ledger_row("forward", "error"),
                                                   ledger_row("reverse")])
    assert consecutive(text) == {"forward": 3, "reverse": 0}
    renamed = iperf_client.prometheus_text(text, [ledger_row("forward", "error", label="lyon")])
    assert consecutive(renamed) == {"forward": 4, "reverse": 0}  # a renamed target: one link
    other = iperf_client.prometheus_text(text, [ledger_row("forward", "error", client="you")])
    assert sorted(consecutive_by_client(other)) == [("me", 0), ("me", 3), ("you", 1)]
    text = iperf_client.prometheus_text(text, [ledger_row("forward"), ledger_row("reverse")])
    assert consecutive(text) == {"forward": 0, "reverse": 0}


def consecutive_by_client(text):
    return [(labels["client"], value) for name, labels, value in samples(text)
            if name == "iperf_consecutive_failures"]


@pytest.mark.parametrize("mean, low, grade, added", [
    ("30.5", "30.5", "A+", 0.0), ("35.4", "30.5", "A+", 0.0049), ("35.5", "30.5", "A", 0.005),
    ("90.5", "30.5", "C", 0.06), ("430", "30.5", "D", 0.3995), ("500", "100", "F", 0.4),
    ("29", "30", "A+", 0.0),  # a mean under the minimum (rounding): no negative delay
])
def test_added_delay_and_its_grade(mean, low, grade, added):
    found = samples(iperf_client.prometheus_text("", [ledger_row(mean_rtt_ms=mean,
                                                                 min_rtt_ms=low)]))
    assert [(labels["grade"], value) for name, labels, value in found
            if name == "iperf_latency_grade"] == [(grade, 1.0)]
    assert [value for name, _, value in found
            if name == "iperf_added_delay_seconds"] == [pytest.approx(added, abs=1e-12)]


@pytest.mark.parametrize("cells", [{"status": "error"}, {"mean_rtt_ms": ""},
                                   {"protocol": "udp", "mean_rtt_ms": "", "min_rtt_ms": ""}])
def test_no_grade_without_both_rtt_figures(cells):
    found = samples(iperf_client.prometheus_text("", [ledger_row(**cells)]))
    assert not [name for name, _, _ in found if name in ("iperf_latency_grade",
                                                         "iperf_added_delay_seconds")]


def read_ledger(folder):
    with open(os.path.join(str(folder), "results.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def assert_grades_match_the_ledger(prom_text, rows):
    """Each direction's added delay in the textfile is its ledger row's mean minus minimum RTT,
    graded on the DSLReports scale; returns {direction: (added ms, grade)}."""
    found = samples(prom_text)
    graded = {}
    for row in rows:
        added_ms = float(row["mean_rtt_ms"]) - float(row["min_rtt_ms"])
        delay = [value for name, labels, value in found if name == "iperf_added_delay_seconds"
                 and labels["direction"] == row["direction"]]
        grade = [labels["grade"] for name, labels, value in found
                 if name == "iperf_latency_grade" and labels["direction"] == row["direction"]]
        assert delay == [pytest.approx(max(0.0, added_ms) / 1000.0, abs=1e-9)], row
        assert grade == [iperf_client.latency_grade(max(0.0, added_ms))], row
        graded[row["direction"]] = (added_ms, grade[0])
    return graded


def loopback_grades(port, tmp_path):
    """A client run on loopback as cron runs it; returns {direction: (added ms, grade)}."""
    prom = tmp_path / "textfile" / "iperf.prom"
    prom.parent.mkdir(exist_ok=True)
    done = run_script(CLIENT_SCRIPT, [
        "-c", "127.0.0.1", "-p", port, "-t", "2", "-P", "2", "-d", tmp_path / "loop",
        "--client-name", CLIENT_NAME, "--timeout-margin", "5", "--busy-wait", "0",
        "--retries", "0", "--prometheus-textfile", prom])
    assert_quiet_success(done)
    graded = assert_grades_match_the_ledger(prom.read_text(), read_ledger(tmp_path / "loop"))
    assert_report_grades(tmp_path / "loop", graded)
    print("loopback:", graded)
    return graded


def test_loopback_run_grades_the_delay_its_load_added(start_iperf3_server, tmp_path):
    # --json: the server's RTT of a reverse test reaches the client (--get-server-output)
    graded = loopback_grades(start_iperf3_server(["--json"]).port, tmp_path)
    assert set(graded) == {"forward", "reverse"}


# --- the grade on the test bed's shaped link --------------------------------------------------

SHAPED_MBIT = 50
ONE_WAY_MS = 25


@pytest.fixture
def shaped_bed(iperf3):
    """The test bed, 50 Mbit/s with 25 ms each way: its shaper holds a queue of 30 ms plus a
    round trip (netbed.NetBed.shape); torn down whatever the test did."""
    ok, why = netbed.available()
    require(ok, "network namespaces (%s)" % why, "REQUIRE_NETNS")
    shape = netbed.Shape(SHAPED_MBIT, delay_ms=ONE_WAY_MS)
    try:
        bed = netbed.NetBed.create(shape, netbed.Shape(SHAPED_MBIT, delay_ms=ONE_WAY_MS))
    except RuntimeError as exc:
        require(False, "network namespaces (%s)" % exc, "REQUIRE_NETNS")
    try:
        yield bed
    finally:
        bed.destroy()


@pytest.mark.netns
def test_a_shaped_loaded_link_grades_by_its_queue_and_worse_than_loopback(
        shaped_bed, start_iperf3_server, tmp_path):
    """On the bed, the queue a test fills adds delay; the textfile's added delay is the
    ledger's mean minus minimum RTT and its grade that figure's. The shaper's queue bounds the
    delay it can add (30 ms + the 50 ms round trip, plus a burst of 4 ms): the figure lies
    between 0 and that, and never above the delay against the path's own 50 ms (iperf3's
    minimum is read under load: the grade is approximate, never worse than the truth).

    With `-i 0.1` the forward test (the client's own sockets) samples its RTT during slow
    start, before the queue fills: its minimum is the path's (measured 50.6-53.0 ms), so its
    added delay is the queue's (measured 29-48 ms, A or B, where loopback's is A+, under 1 ms).
    The reverse test's RTT is the server's, sampled every second whatever -i says: its minimum
    is read under load (measured 59-67 ms, added 39-52 ms; without -i 0.1 the forward one read
    71-100 ms and added 5-17 ms), so only its consistency is asserted."""
    loopback = loopback_grades(start_iperf3_server(["--json"]).port, tmp_path)
    server = shaped_bed.exec_in(shaped_bed.server_ns, [
        sys.executable, SERVER_SCRIPT, "--pidfile", tmp_path / "iperf.pid", "--log-file",
        tmp_path / "server.log", "-p", "5201", "-B", netbed.SERVER_ADDR], check=False, timeout=60)
    assert_quiet_success(server)
    prom = tmp_path / "bed.prom"
    done = shaped_bed.exec_in(shaped_bed.client_ns, [
        sys.executable, CLIENT_SCRIPT, "-c", netbed.SERVER_ADDR, "-p", "5201", "-t", "4",
        "-P", "2", "-d", tmp_path / "bed", "--client-name", CLIENT_NAME, "--timeout-margin", "5",
        "--prometheus-textfile", prom, "--", "-i", "0.1"], check=False, timeout=120)
    assert_quiet_success(done)
    rows = read_ledger(tmp_path / "bed")
    graded = assert_grades_match_the_ledger(prom.read_text(), rows)
    queue_ms = 30 + 2 * ONE_WAY_MS + 4
    for row in rows:
        added_ms, grade = graded[row["direction"]]
        against_path = float(row["mean_rtt_ms"]) - 2 * ONE_WAY_MS
        print(row["direction"], "shaped: min %s ms, mean %s ms, added %.1f ms (%s); against "
              "the path's 50 ms %.1f ms (%s)" % (
                  row["min_rtt_ms"], row["mean_rtt_ms"], added_ms, grade, against_path,
                  iperf_client.latency_grade(against_path)))
        assert 0 < added_ms <= against_path <= queue_ms + 10, row
        assert GRADE_ORDER.index(grade) <= GRADE_ORDER.index(
            iperf_client.latency_grade(against_path))
    added_ms, grade = graded["forward"]
    assert float(by_direction(rows)["forward"]["min_rtt_ms"]) < 2 * ONE_WAY_MS + 10, rows
    assert 20 <= added_ms <= queue_ms, rows  # the queue's delay: 20 ms at least, a round trip in
    assert GRADE_ORDER.index(grade) > GRADE_ORDER.index(loopback["forward"][1]), (
        graded, loopback)
    assert_report_grades(tmp_path / "bed", graded)


def assert_report_grades(folder, graded):
    """The report (JSON and text) grades each direction as the textfile does: one test a
    direction, so the medians are that test's figures."""
    done = run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--format", "json"])
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["links"][0]["summary"]
    for direction, (added_ms, grade) in graded.items():
        assert summary[direction]["latency_grade"] == grade, summary[direction]
        assert abs(summary[direction]["added_delay_ms"] - added_ms) < 0.01, summary[direction]
    text = run_script(CLIENT_SCRIPT, ["report", "-d", folder]).stdout
    for direction, (added_ms, grade) in graded.items():
        assert "grade (approx.) %s" % grade in text, text


def by_direction(rows):
    return {row["direction"]: row for row in rows}


# --- the shipped rules and dashboard, on real node_exporter and Prometheus ---------------------

def tool(*names):
    """The first of `names` on PATH (node_exporter is `prometheus-node-exporter` on Debian)."""
    return next((shutil.which(name) for name in names if shutil.which(name)), None)


def promtool():
    path = tool("promtool")
    require(path is not None, "promtool", "REQUIRE_PROMETHEUS")
    return path


def test_promtool_checks_the_rules():
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    """Each alert fired by a series and held back for one dip, a recovered link, a stale
    series (docs/prometheus/continuous-iperf.rules.test.yml); about 30 s (8 days of series)."""
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=str(RULES_DIR),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout


def http_json(url):
    """(status, parsed JSON body) of a GET; an HTTP error's body too (Prometheus explains a
    rejected query in it)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace")
        try:
            return error.code, json.loads(body)
        except ValueError:  # not the API's answer (still starting: "Service Unavailable")
            return error.code, {"body": body}
    except (urllib.error.URLError, OSError, ValueError):
        return None, {}


class Fleet:
    """One client's textfile folder, node_exporter serving it and Prometheus scraping it every
    second with the shipped rules; `query()` asks Prometheus."""

    def __init__(self, folder):
        self.folder = folder
        self.textfiles = folder / "textfile"
        self.textfiles.mkdir()
        self.prom = self.textfiles / "iperf.prom"
        self.procs = []
        self.prometheus_url = None

    def client(self, port, *more):
        """One client run, as cron runs it, into the textfile folder."""
        return run_script(CLIENT_SCRIPT, [
            "-c", "127.0.0.1", "-p", port, *QUICK, "-P", "2", "-d", self.folder / "results",
            "--client-name", CLIENT_NAME, "--prometheus-textfile", self.prom, *more])

    def start(self, node_exporter, prometheus):
        exporter_port, prometheus_port = free_port(), free_port()
        self.spawn([node_exporter, "--web.listen-address=127.0.0.1:%d" % exporter_port,
                    "--collector.disable-defaults", "--collector.textfile",
                    "--collector.textfile.directory=%s" % self.textfiles], "node_exporter")
        config = self.folder / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files:\n  - %s\n"
            "scrape_configs:\n  - job_name: node\n    static_configs:\n"
            "      - targets: ['127.0.0.1:%d']\n" % (json.dumps(str(RULES)), exporter_port))
        self.spawn([prometheus, "--config.file=%s" % config,
                    "--storage.tsdb.path=%s" % (self.folder / "tsdb"),
                    "--web.listen-address=127.0.0.1:%d" % prometheus_port], "prometheus")
        self.prometheus_url = "http://127.0.0.1:%d" % prometheus_port
        ready = wait_until(lambda: http_json(self.prometheus_url + "/api/v1/status/buildinfo")[0]
                           == 200 or any(p.poll() is not None for p in self.procs), timeout=60)
        assert ready and all(p.poll() is None for p in self.procs), self.logs()

    def spawn(self, argv, name):
        log = open(str(self.folder / (name + ".log")), "w")
        self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT))
        log.close()

    def logs(self):
        return {name: (self.folder / (name + ".log")).read_text()[-2000:]
                for name in ("node_exporter", "prometheus")}

    def query(self, expr):
        """(HTTP status, the API's answer) of an instant query."""
        return http_json(self.prometheus_url + "/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}))

    def result(self, expr):
        status, answer = self.query(expr)
        assert status == 200 and answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def stop(self):
        for proc in self.procs:
            kill_process(proc)


# The tests on the real Prometheus share one (a module fixture) on one xdist worker, in file
# order: the last one takes the client's server down.
ONE_PROMETHEUS = pytest.mark.xdist_group("prometheus")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A TCP run and a UDP run of one client into its textfile folder, served and scraped; both
    processes (and the iperf3 server) killed afterwards, also when a test fails."""
    node_exporter = tool("prometheus-node-exporter", "node_exporter")
    prometheus = tool("prometheus")
    require(node_exporter and prometheus, "prometheus and node_exporter", "REQUIRE_PROMETHEUS")
    require(iperf3_path() is not None, "iperf3", "REQUIRE_IPERF3")
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    server = IperfServer(iperf3_path(), free_port(), ["--json"])
    try:
        assert_quiet_success(fleet.client(server.port))
        assert_quiet_success(fleet.client(server.port, "--udp", "10M", "--prefix", "udp-"))
        fleet.server_port = str(server.port)
        fleet.start(node_exporter, prometheus)
        # Every test reads what Prometheus scraped: wait for the first scrape of both runs.
        scraped(fleet, 'iperf_received_bits_per_second{client="%s"}' % CLIENT_NAME, 4)
        yield fleet
    finally:
        fleet.stop()
        server.stop()


def scraped(fleet, expr, count=1):
    """The result of `expr` once Prometheus has scraped (and evaluated) it: at least `count`
    series."""
    found = wait_until(lambda: len(fleet.result(expr)) >= count and fleet.result(expr),
                       timeout=60, interval=0.5)
    assert found, (expr, fleet.logs())
    return found


@ONE_PROMETHEUS
def test_prometheus_has_every_series_with_its_labels(fleet):
    expected = {}
    for name, labels, _ in samples(fleet.prom.read_text()):
        expected.setdefault(name, set()).add(tuple(sorted(labels.items())))
    assert {"iperf_latency_grade", "iperf_jitter_seconds", "iperf_consecutive_failures"} \
        <= set(expected)
    for name, label_sets in expected.items():
        found = scraped(fleet, name, len(label_sets))
        got = {tuple(sorted((key, value) for key, value in series["metric"].items()
                            if key not in ("__name__", "instance", "job"))) for series in found}
        assert got == label_sets, name
        for series in found:
            assert series["metric"]["client"] == CLIENT_NAME
            assert series["metric"]["label"] == "127.0.0.1"  # its default: the host
            assert series["metric"]["job"] == "node"


@ONE_PROMETHEUS
def test_every_rule_loads_and_evaluates_healthy(fleet):
    shipped = len(re.findall(r"^\s+- (?:record|alert):", RULES.read_text(), re.M))

    def evaluated():
        rules = [rule for group in http_json(fleet.prometheus_url + "/api/v1/rules")[1].get(
            "data", {}).get("groups", []) for rule in group["rules"]]
        done = len(rules) == shipped and all(
            rule["health"] == "ok" and not rule["lastEvaluation"].startswith("0001")
            for rule in rules)
        return rules if done else None

    rules = wait_until(evaluated, timeout=60, interval=0.5)
    assert rules, http_json(fleet.prometheus_url + "/api/v1/rules")
    alerts = [rule for rule in rules if rule["type"] == "alerting"]
    assert len(alerts) >= 8
    for rule in alerts:  # each names its link, for whoever is paged
        for text in (rule["annotations"]["summary"], rule["annotations"]["description"]):
            for label in ("client", "label", "server", "port"):
                assert "$labels.%s" % label in text, (rule["name"], text)
    # The records of the latest hour and the floor are computed from the client's series.
    for record in ("iperf_link:received_bits_per_second:median1h",
                   "iperf_link:floor_bits_per_second", "iperf_link:last_test_age_seconds"):
        assert scraped(fleet, record, 2)[0]["metric"]["client"] == CLIENT_NAME


def dashboard_queries():
    """(panel title, expr) of every query of the dashboard, and its variables' queries."""
    board = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in board["panels"]
               for target in panel["targets"]]
    variables = [v for v in board["templating"]["list"] if v["type"] == "query"]
    return queries, variables


def concrete(expr):
    """A dashboard query as Grafana sends it with "All" chosen (allValue .*) and a 1 m
    interval."""
    for variable, value in (("$client", ".*"), ("$server", ".*"), ("$__rate_interval", "1m"),
                            ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


@ONE_PROMETHEUS
def test_every_dashboard_query_is_valid_promql_and_throughput_shows_the_client(fleet):
    queries, _ = dashboard_queries()
    assert len(queries) >= 10
    scraped(fleet, "iperf_received_bits_per_second", 4)
    for title, expr in queries:
        status, answer = fleet.query(concrete(expr))
        assert status == 200 and answer.get("status") == "success", (title, expr, answer)
        if "hroughput" in title or "received" in expr:
            result = answer["data"]["result"]
            assert result and {series["metric"]["client"] for series in result} == {
                CLIENT_NAME}, (title, expr, result)


@ONE_PROMETHEUS
def test_dashboard_variables_list_the_client_and_its_server(fleet):
    _, variables = dashboard_queries()
    assert {v["name"]: (v["includeAll"], v["allValue"]) for v in variables} == {
        "client": (True, ".*"), "server": (True, ".*")}
    for variable in variables:
        match = re.match(r"^label_values\((.+), (\w+)\)$", variable["query"]["query"])
        assert match, variable
        status, answer = http_json(fleet.prometheus_url + "/api/v1/label/%s/values?%s" % (
            match.group(2), urllib.parse.urlencode({"match[]": concrete(match.group(1))})))
        assert status == 200 and answer["data"] == [
            {"client": CLIENT_NAME, "server": "127.0.0.1"}[variable["name"]]], answer


@ONE_PROMETHEUS
def test_three_failed_runs_fire_the_failing_alert(fleet):
    """Last, as it takes the client's server down: three failed runs in a row fire
    IperfTestsFailing for the link, in each direction."""
    down = str(free_port())
    for _ in range(3):
        assert fleet.client(down).returncode == 1
    link = '{alertname="IperfTestsFailing",alertstate="firing",client="%s",port="%s"}' % (
        CLIENT_NAME, down)
    firing = scraped(fleet, "ALERTS" + link, 2)
    assert {alert["metric"]["direction"] for alert in firing} == {"forward", "reverse"}
    assert not fleet.result('ALERTS{alertname="IperfTestsFailing",port="%s"}'
                            % fleet.server_port)
