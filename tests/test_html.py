"""Tests of `report --html`: the page parsed with html.parser (structure, both series, failures,
nothing external), drawn from real runs, and rendered in a real headless Chromium."""

import datetime
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest

from conftest import (CANNOT_CONNECT, CLIENT_SCRIPT, QUICK, free_port, paced, require, row_at,
                      run_script, says, write_ledger)

import iperf_client

NOW = 1764331200.0  # 2025-11-28 12:00 UTC: the fixed "now" of the made-up ledgers


class Page(HTMLParser):
    """Every element of a page as [tag, attributes, its text before the next tag]."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.elements = []
        self.doctype = None
        self.current = None
        self.feed(text)
        self.close()

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.elements.append([tag, dict(attrs), ""])
        self.current = self.elements[-1]

    def handle_endtag(self, tag):
        self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.current[2] += data

    def find(self, tag, css=None):
        """Elements of `tag` whose class attribute holds every word of `css`."""
        words = set((css or "").split())
        return [e for e in self.elements if e[0] == tag
                and words <= set(e[1].get("class", "").split())]

    def text(self):
        return " ".join(e[2] for e in self.elements)


def day_of_runs(start=NOW - 86400, runs=96, interval=900, pause=(40, 52), failed=(10, 70)):
    """A day of runs every 15 minutes: forward near 9.4 Gbit/s, reverse near 8.9 Gbit/s, a pause
    (no run at all) and a run whose two tests failed."""
    rows = []
    for index in range(runs):
        if pause[0] <= index < pause[1]:
            continue
        moment = start + index * interval
        if index in failed:
            rows.append(row_at(moment, "forward", error="unable to connect to server: refused"))
            rows.append(row_at(moment + 60, "reverse", error="the server is busy", run_at=moment))
            continue
        rows.append(row_at(moment, "forward", 9.4e9 + (index % 7) * 1e7))
        rows.append(row_at(moment + 60, "reverse", 8.9e9 - (index % 5) * 1e7, run_at=moment))
    return rows


def hours_with_tests(rows, direction):
    return len({r["timestamp"][11:13] for r in rows
                if r["direction"] == direction and r["status"] == "ok"})


def make_report(folder, *more):
    target = folder / "report.html"
    args = ["report", "-d", str(folder), "--html", str(target)] + list(more)
    assert iperf_client.main(args) == 0
    return target.read_text()


def external_references(page):
    """Attributes that would fetch something: src/href/xlink:href/action to a URL or path."""
    found = []
    for tag, attrs, _ in page.elements:
        for name, value in attrs.items():
            if name in ("src", "href", "xlink:href", "action", "srcset", "data", "poster") and not (
                    name == "href" and value.startswith("#")):  # a place on the page itself
                found.append((tag, name, value))
            elif value and ("http:" in value or "https:" in value or value.startswith("//")):
                found.append((tag, name, value))
    return found


# --- the page, parsed --------------------------------------------------------------------------

def test_page_structure_series_and_failures(tmp_path, capsys):
    rows = day_of_runs()
    write_ledger(tmp_path, rows)
    text = make_report(tmp_path)
    assert capsys.readouterr() == ("", "")  # --html prints nothing
    page = Page(text)
    assert page.doctype.lower() == "doctype html"
    assert [e[0] for e in page.elements[:3]] == ["html", "head", "meta"]
    # One link's page is the page of several with one entry: the links table, then its section.
    assert [e[2] for e in page.find("h2")] == ["Links", "192.0.2.7:5201"]
    assert [e[2] for e in page.find("h3")] == [
        "Received throughput", "Median by hour of day", "Summary", "Failed runs"]
    charts = page.find("svg", "chart")
    assert [c[1]["class"] for c in charts] == ["chart time-chart", "chart hour-chart"]
    assert all(c[1]["viewbox"].startswith("0 0 ") for c in charts)
    assert "width:100%" in page.find("style")[0][2]
    assert page.find("meta")[1][1] == {"name": "viewport",
                                       "content": "width=device-width, initial-scale=1"}
    for direction in ("forward", "reverse"):
        lines = page.find("polyline", "series " + direction)
        # The pause of 3 hours and the two failed runs each break the line: 4 pieces.
        assert len(lines) == 4, direction
        points = sum(len(line[1]["points"].split()) for line in lines)
        assert points == 96 - 12 - 2
        assert len(page.find("line", "median " + direction)) == 1
        assert len(page.find("rect", "hour-bar " + direction)) == hours_with_tests(
            rows, direction)
        crosses = page.find("path", "failure " + direction)
        assert len(crosses) == 2
        titles = re.findall(r'<path class="failure %s"[^>]*><title>([^<]*)</title>' % direction,
                            text)
        assert len(titles) == 2 and all(direction + " failed: " in title for title in titles)
    assert len({line[1]["stroke-dasharray"] for line in page.find("polyline", "reverse")}) == 1
    assert not any("stroke-dasharray" in line[1] for line in page.find("polyline", "forward"))
    # The axis of a chart of 9 Gbit/s figures counts in Gbit/s (the summary table aside).
    time_chart = re.search(r'<svg[^>]*class="[^"]*time-chart.*?</svg>', text, re.S).group(0)
    assert "Gbit/s" in time_chart and "Mbit/s" not in time_chart
    failed = page.find("table", "failed")
    assert failed
    assert text.count("unable to connect to server: refused") >= 2
    assert text.count("the server is busy") >= 2


def test_summary_table_holds_the_report_figures(tmp_path):
    rows = day_of_runs()
    write_ledger(tmp_path, rows)
    page = Page(make_report(tmp_path))
    cells = [e[2] for e in page.elements if e[0] in ("td", "th")]
    table = cells[cells.index("retransmits") + 1:]
    for direction in ("forward", "reverse"):
        values = [float(r["received_bps"]) for r in rows
                  if r["direction"] == direction and r["status"] == "ok"]
        line = table[table.index(direction):table.index(direction) + 13]
        assert line[1:4] == [str(len(values) + 2), str(len(values)), "2"]
        assert line[5] == "0"  # skipped runs
        assert line[6] == iperf_client.human_bps(statistics.median(values))
        assert line[7] == iperf_client.human_bps(statistics.mean(values))
        assert line[10:12] == [iperf_client.human_bps(min(values)),
                               iperf_client.human_bps(max(values))]
        assert line[12] == str(7 * len(values))


def test_nothing_external_and_no_script(tmp_path):
    rows = day_of_runs()
    rows.append(row_at(NOW - 30, "forward", error='<script src="http://evil/x.js"></script> & co'))
    write_ledger(tmp_path, rows)
    text = make_report(tmp_path)
    page = Page(text)
    assert external_references(page) == []
    for tag in ("script", "link", "img", "iframe", "object", "embed", "image", "use"):
        assert page.find(tag) == [], tag
    assert "@import" not in text and "url(" not in text
    assert '&lt;script src=&quot;http://evil/x.js&quot;&gt;' in text


def test_units_follow_the_scale_and_a_single_test_is_a_dot(tmp_path):
    write_ledger(tmp_path, [row_at(NOW - 600, "forward", 94.2e6),
                            row_at(NOW - 540, "reverse", 8e6)])
    page = Page(make_report(tmp_path))
    chart_text = " ".join(e[2] for e in page.elements if e[0] == "text")
    assert "Mbit/s" in chart_text and "Gbit/s" not in chart_text
    assert len(page.find("circle", "point forward")) == 1
    assert len(page.find("circle", "point reverse")) == 1


def test_filters_apply_to_the_page(tmp_path):
    rows = day_of_runs()
    write_ledger(tmp_path, rows)
    since = datetime.datetime.fromtimestamp(NOW - 6 * 3600).isoformat()
    page = Page(make_report(tmp_path, "--since", since, "--direction", "reverse"))
    assert page.find("polyline", "series forward") == []
    points = sum(len(e[1]["points"].split()) for e in page.find("polyline", "series reverse"))
    assert points == len([r for r in rows if r["direction"] == "reverse"
                          and r["status"] == "ok" and iperf_client.row_time(r["timestamp"])
                          >= NOW - 6 * 3600])


def test_only_failures_is_a_page_of_crosses(tmp_path):
    rows = [row_at(NOW - 600 * i, "forward" if i % 2 else "reverse", error="refused %d" % i)
            for i in range(6)]
    write_ledger(tmp_path, rows)
    page = Page(make_report(tmp_path))
    assert page.find("polyline") == [] and page.find("circle") == []
    assert len(page.find("path", "failure forward")) == 3
    assert len(page.find("path", "failure reverse")) == 3
    assert len(page.find("table", "failed")) == 1 and "refused 5" in page.text()


def test_empty_folder_is_a_page_saying_so(tmp_path):
    page = Page(make_report(tmp_path))
    assert "No results" in page.text()
    assert page.find("svg") == []


def test_a_year_is_thinned_to_a_light_page(tmp_path):
    rows = []
    for index in range(8000):  # 8,000 runs, an hour apart: almost a year
        moment = NOW - (8000 - index) * 3600
        rows += [row_at(moment, "forward", 9e8 + index % 11 * 1e6),
                 row_at(moment + 60, "reverse", 8e8 + index % 13 * 1e6, run_at=moment)]
    write_ledger(tmp_path, rows)
    text = make_report(tmp_path)
    page = Page(text)
    for direction in ("forward", "reverse"):
        points = sum(len(e[1]["points"].split()) for e in page.find("polyline", direction))
        assert 100 < points <= iperf_client.MAX_POINTS
    assert len(text) < 200000


def test_written_atomically_and_errors_are_one_line(tmp_path, capsys):
    write_ledger(tmp_path, day_of_runs())
    target = tmp_path / "out" / "r.html"
    target.parent.mkdir()
    target.write_text("old")
    assert iperf_client.main(["report", "-d", str(tmp_path), "--html", str(target)]) == 0
    assert os.listdir(str(target.parent)) == ["r.html"]
    assert target.read_text().startswith("<!DOCTYPE html>")
    missing = tmp_path / "nowhere" / "r.html"
    assert iperf_client.main(["report", "-d", str(tmp_path), "--html", str(missing)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot write" in err and "Traceback" not in err


@pytest.mark.parametrize("start, end, step, first", [
    ("2025-11-28 00:00", "2025-11-28 06:00", 3600, "00:00"),
    ("2025-11-28 00:07", "2025-11-28 00:50", 600, "00:10"),
    ("2025-11-27 13:20", "2025-11-28 13:20", 10800, "15:00"),
    ("2025-11-20 10:00", "2025-11-28 10:00", 86400, "00:00"),
])
def test_time_ticks_fall_on_round_local_times(start, end, step, first):
    def unix(text):
        return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M").timestamp()
    ticks, found = iperf_client.time_ticks(unix(start), unix(end))
    assert found == step
    assert 3 <= len(ticks) <= 9
    assert datetime.datetime.fromtimestamp(ticks[0]).strftime("%H:%M") == first
    assert all(b - a == step for a, b in zip(ticks, ticks[1:]))


@pytest.mark.parametrize("top, expected", [
    (9.43, [0, 2, 4, 6, 8, 10]), (1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (940, [0, 200, 400, 600, 800, 1000]), (0, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (12.5, [0, 2.5, 5, 7.5, 10, 12.5]),
])
def test_axis_ticks_are_round_numbers_reaching_the_top(top, expected):
    assert iperf_client.nice_ticks(top) == pytest.approx(expected)


def test_a_line_breaks_where_no_test_ran_or_a_test_failed():
    points = [(t, 1.0, None) for t in (0, 60, 120, 180, 600, 660, 720)]
    assert [len(s) for s in iperf_client.split_at_gaps(points)] == [4, 3]
    points[1] = (60, None, None)  # a failed test breaks the line too
    assert [len(s) for s in iperf_client.split_at_gaps(points)] == [1, 2, 3]


# --- from real runs ----------------------------------------------------------------------------

@pytest.mark.slow
def test_html_from_real_runs_and_a_failed_one(start_iperf3_server, tmp_path):
    folder = tmp_path / "results"
    port = free_port()
    args = paced(["--server", "127.0.0.1", *QUICK, "-P", "2", "-d", folder, "-p", port])
    server = start_iperf3_server(port=port)
    assert run_script(CLIENT_SCRIPT, args).returncode == 0
    server.stop()  # the same link, down for one run
    assert run_script(CLIENT_SCRIPT, args).returncode == 1
    start_iperf3_server(port=port)
    assert run_script(CLIENT_SCRIPT, args).returncode == 0
    done = run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--html", folder / "r.html"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    text = (folder / "r.html").read_text()
    page = Page(text)
    ledger = (folder / "results.csv").read_text()
    charts = text.split("<svg")
    throughput = Page(charts[1])
    for direction in ("forward", "reverse"):
        dots = throughput.find("circle", "point " + direction)
        assert len(throughput.find("polyline", "series " + direction)) + len(dots) == 2
        assert len(throughput.find("path", "failure " + direction)) == 1
    # The RTT chart: the forward tests' own RTT (2 ok tests, a failure); the reverse tests' is
    # the server's, which a plain `iperf3 -s` (no --json) does not send: none drawn.
    rtt = Page(next(chart for chart in charts if "rtt-chart" in chart.split(">", 1)[0]))
    forward = rtt.find("circle", "point forward") + rtt.find("polyline", "series forward")
    assert len(forward) in (1, 2) and len(rtt.find("path", "failure forward")) == 1
    assert rtt.find("circle", "point reverse") + rtt.find("polyline", "series reverse") == []
    assert says(page.text(), CANNOT_CONNECT) and says(ledger, CANNOT_CONNECT)
    assert external_references(page) == []


# --- in a real browser -------------------------------------------------------------------------

def chromium(tmp_path, *args, timeout=60):
    """Run headless Chromium (as root: no sandbox) and return its stdout; it and every process
    it started are killed whatever happens."""
    executable = shutil.which("chromium")
    require(executable is not None, "chromium", "REQUIRE_BROWSER")
    argv = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--user-data-dir=%s" % (tmp_path / "chromium-profile")] + list(args)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def png_pixels(path):
    """Decode an 8-bit RGB or RGBA PNG with zlib and struct: (width, height, rows of bytes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, header = 8, [], None
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        offset += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    size = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * size
    rows, previous = [], bytearray(stride)
    for y in range(height):
        begin = y * (stride + 1)
        kind, line = raw[begin], bytearray(raw[begin + 1:begin + 1 + stride])
        if kind == 1:
            for i in range(size, stride):
                line[i] = (line[i] + line[i - size]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, previous))
        elif kind == 3:
            for i in range(stride):
                left = line[i - size] if i >= size else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - size] if i >= size else 0
                b, c = previous[i], previous[i - size] if i >= size else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, size, rows


@pytest.fixture
def report_page(tmp_path):
    write_ledger(tmp_path, day_of_runs())
    make_report(tmp_path)
    return tmp_path / "report.html"


@pytest.mark.slow
@pytest.mark.browser
def test_browser_dom_holds_the_chart_lines(report_page, tmp_path):
    dom = Page(chromium(tmp_path, "--dump-dom", report_page.as_uri()))
    for direction in ("forward", "reverse"):
        assert len(dom.find("polyline", "series " + direction)) == 4
        assert len(dom.find("path", "failure " + direction)) == 2
        assert len(dom.find("rect", "hour-bar " + direction)) == 21  # the pause took 3 hours
    assert len(dom.find("svg", "chart")) == 2


@pytest.mark.browser
def test_browser_screenshot_is_not_blank(report_page, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--screenshot=%s" % shot, "--window-size=1200,900",
             "--hide-scrollbars", report_page.as_uri())
    width, height, size, rows = png_pixels(shot)
    assert (width, height) == (1200, 900)
    colours = {}
    for line in rows[::3]:
        for x in range(0, width * size, size * 3):
            pixel = line[x:x + 3]
            colours[pixel] = colours.get(pixel, 0) + 1
    assert len(colours) > 20  # not one flat colour: text, grid, lines
    white = colours.get(b"\xff\xff\xff", 0)
    assert white < 0.97 * sum(colours.values())

    def near(target):
        return sum(n for c, n in colours.items() if max(abs(a - b) for a, b in zip(c, target))
                   < 40)
    assert near((0x08, 0x30, 0x6b)) > 20  # the forward line and bars were drawn
    assert near((0xd5, 0x5e, 0x00)) > 20  # the reverse line
