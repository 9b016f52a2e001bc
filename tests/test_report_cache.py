"""The report cache (.report-cache in a results folder): what a report counted, so that the next
one reads only the ledger's new lines. Its figures must be those of a whole read, whatever was
done to the ledger or to the cache in between: a cache that does not match is never believed."""

import hashlib
import json
import os
import random
import re

import pytest

from conftest import CLIENT_SCRIPT, run_script
from test_report_scale import START, expected, generated_rows, stamp, write

import iperf_client

CACHE_DIR = iperf_client.REPORT_CACHE_DIR


def report(folder, *args, folders=(), warning=""):
    """The report's output (text unless args say otherwise), its ages and now-dependent
    times blanked: two reports a moment apart must print the same."""
    argv = ["report", "-d", folder]
    for other in folders:
        argv += ["-d", other]
    done = run_script(CLIENT_SCRIPT, argv + list(args))
    assert done.returncode == 0 and warning in done.stderr, done.stderr
    assert done.stderr == "" or warning and done.stderr.count("\n") == 1, done.stderr
    text = re.sub(r'"age_s": [0-9.e+-]+', '"age_s": 0', done.stdout)
    return re.sub(r"\([0-9.]+ (?:min|h|d|s)[a-z]* ago\)", "(AGE)", text)


def whole(folder, *args, folders=(), warning=""):
    return report(folder, "--no-cache", *args, folders=folders, warning=warning)


def caches(folder):
    path = folder / CACHE_DIR
    return sorted(os.listdir(str(path))) if path.is_dir() else []


def cache_head(folder):
    (name,) = caches(folder)
    with open(str(folder / CACHE_DIR / name), "rb") as handle:
        handle.readline()  # the SHA-256 of the rest
        return json.loads(handle.readline())


def ledger_lines(folder):
    with open(str(folder / "results.csv"), newline="") as handle:
        return handle.readlines()


def write_lines(folder, lines, mode="w"):
    with open(str(folder / "results.csv"), mode, newline="") as handle:
        handle.write("".join(lines))


@pytest.fixture
def grown(tmp_path):
    """A ledger just larger than REPORT_CACHE_MIN_BYTES (from where a cache pays) written, and
    about 1,200 lines more (its growth) returned."""
    rows = generated_rows(random.Random(11), runs=1050)
    write(tmp_path, rows)
    lines, size = ledger_lines(tmp_path), 0
    for cut, line in enumerate(lines):
        size += len(line.encode())
        if size > iperf_client.REPORT_CACHE_MIN_BYTES + 20000:
            break
    assert 1000 < len(lines) - cut < 1500
    write_lines(tmp_path, lines[:cut])
    return tmp_path, lines[cut:]


def test_the_cache_reads_only_new_lines_and_its_figures_are_a_whole_read(grown):
    folder, later = grown
    assert report(folder) == whole(folder)
    assert caches(folder) != []
    write_lines(folder, later[:500], "a")
    write_lines(folder, [later[500][:40]], "a")  # a run appending its row this moment
    first = report(folder, "--format", "json")
    covered = cache_head(folder)["ledger"][0]
    assert covered == os.path.getsize(str(folder / "results.csv")) - 40  # whole lines only
    assert first == whole(folder, "--format", "json")
    write_lines(folder, [later[500][40:]] + later[501:], "a")  # the row completed, and more
    data = report(folder, "--format", "json")
    assert data == whole(folder, "--format", "json")
    assert cache_head(folder)["ledger"][0] == os.path.getsize(str(folder / "results.csv"))
    assert sum(link["summary"]["forward"]["count"] + link["summary"]["reverse"]["count"]
               for link in json.loads(data)["links"]) > sum(
        link["summary"]["forward"]["count"] + link["summary"]["reverse"]["count"]
        for link in json.loads(first)["links"])
    # The page holds what the text does not: failures' times and errors, lowest runs, buckets.
    page, page_whole = folder / "cached.html", folder / "whole.html"
    report(folder, "--html", page)
    whole(folder, "--html", page_whole)
    blank = (lambda text: re.sub(r"; made [^<]*", "", text))
    assert blank(page.read_text()) == blank(page_whole.read_text())


def test_an_edited_rotated_or_rebuilt_ledger_is_read_whole(grown):
    folder, later = grown
    lines = ledger_lines(folder)
    report(folder, "--format", "json")
    # One figure edited in the middle, the ledger's size and last line unchanged.
    index, line = next((number, line) for number, line in enumerate(lines)
                       if number > 2000 and ",ok," in line)
    cells = line.split(",")
    cells[11] = "1" + cells[11][1:] if cells[11][0] != "1" else "2" + cells[11][1:]
    before = report(folder, "--format", "json")
    write_lines(folder, lines[:index] + [",".join(cells)] + lines[index + 1:])
    after = report(folder, "--format", "json")
    assert after == whole(folder, "--format", "json") and after != before
    # Rotated: a shorter ledger than the cache covers.
    write_lines(folder, lines[:len(lines) - 300])
    assert report(folder, "--format", "json") == whole(folder, "--format", "json")
    assert cache_head(folder)["ledger"][0] == os.path.getsize(str(folder / "results.csv"))
    # Rebuilt by hand with other rows but the same length of prefix: read whole.
    write_lines(folder, [lines[0]] + later + lines[1:len(lines) - len(later)])
    assert report(folder, "--format", "json") == whole(folder, "--format", "json")


def flip_a_figure(data):
    """The cache with one digit of a sum in its JSON changed: still valid JSON."""
    at = data.index(b'"sides": [["forward", [') + len(b'"sides": [["forward", [')
    at = data.index(b", ", at) + 2  # the retransmits' sum
    digit = data[at:at + 1]
    return data[:at] + (b"8" if digit == b"9" else b"9") + data[at + 1:]


def claim_too_much(data):
    """The cache with a length in its head that the file cannot hold, its own SHA-256 made
    right again: only the check of the lengths against the file's size stands in the way."""
    _, line, rest = data.split(b"\n", 2)
    head = json.loads(line)
    head["runs"][0][1] = 10 ** 13
    line = json.dumps(head).encode()
    return hashlib.sha256(line + b"\n" + rest).hexdigest().encode() + b"\n" + line + b"\n" + rest


@pytest.mark.parametrize("damage", ["truncated", "flipped", "figure", "lengths", "garbage",
                                    "empty"])
def test_a_damaged_cache_is_ignored_and_rewritten(grown, damage):
    folder, _ = grown
    truth = whole(folder, "--format", "json")
    report(folder, "--format", "json")
    (name,) = caches(folder)
    path = folder / CACHE_DIR / name
    data = path.read_bytes()
    damaged = {"truncated": data[:len(data) // 2],
               "flipped": data[:-1000] + bytes([data[-1000] ^ 1]) + data[-999:],
               "figure": flip_a_figure(data), "lengths": claim_too_much(data),
               "garbage": b"\x00\xff" * 100, "empty": b""}[damage]
    path.write_bytes(damaged)
    assert report(folder, "--format", "json") == truth
    assert report(folder, "--format", "json") == truth
    assert path.read_bytes() != damaged


def test_no_cache_for_a_span_back_from_now_a_small_ledger_or_no_cache(grown, tmp_path_factory):
    folder, _ = grown
    report(folder, "--since", "4000d")
    report(folder, "--no-cache")
    report(folder, "--format", "csv")
    report(folder, "--format", "json", "--runs")
    assert caches(folder) == []
    small = tmp_path_factory.mktemp("small")
    write(small, generated_rows(random.Random(1), runs=50))
    report(small)
    assert caches(small) == []


def test_each_selection_keeps_its_own_cache_and_the_latest_are_kept(grown):
    folder, _ = grown
    selections = [[], ["--server", "192.0.2.10", "--protocol", "udp"],
                  ["--direction", "reverse", "--prefix", ""],
                  ["--since", stamp(START + 86400), "--until", stamp(START + 5 * 86400)]]
    truths = [whole(folder, "--format", "json", *args) for args in selections]
    assert len(set(truths)) == len(selections)
    for args, truth in zip(selections, truths):
        assert report(folder, "--format", "json", *args) == truth
    assert len(caches(folder)) == len(selections)
    for args, truth in zip(selections, truths):  # from the caches now
        assert report(folder, "--format", "json", *args) == truth
    assert len(caches(folder)) == len(selections)
    # Older selections' caches (their files' times a day back and more): the oldest go.
    kept = iperf_client.REPORT_CACHES_KEPT
    for number in range(kept):
        old = folder / CACHE_DIR / ("%020d" % number)
        old.write_bytes(b"")
        os.utime(str(old), (START, START + number * 86400))
    stale = ["%020d" % number for number in range(kept)]
    report(folder, "--since", stamp(START + 3600))  # one more selection
    left = caches(folder)
    assert len(left) == kept
    assert [name for name in left if name in stale] == stale[len(selections) + 1:]


def test_several_folders_each_with_its_cache_are_one_set_of_links(tmp_path):
    """Two folders of one client name (a host moved): their rows are one link's, and the
    figures are those of all the rows, exactly, from the caches as from a whole read."""
    rows = generated_rows(random.Random(4), runs=1800)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write(first, rows[:len(rows) // 2])
    write(second, rows[len(rows) // 2:])
    shared = "the client name host appears in more than one folder"
    for _ in range(2):
        cached = report(first, "--format", "json", folders=[second], warning=shared)
    assert caches(first) != [] and caches(second) != []
    assert cached == whole(first, "--format", "json", folders=[second], warning=shared)
    text = report(first, folders=[second], warning=shared)
    assert text == whole(first, folders=[second], warning=shared)
    # A run cut in two by the folders' split (its rows in both) is one run.
    assert rows[len(rows) // 2 - 1]["run"] == rows[len(rows) // 2]["run"]
    assert re.search(r"period: .* (\d+) runs\n", text).group(1) == str(
        len({row["run"] for row in rows}))
    links = {(link["server"], link["protocol"]): link for link in json.loads(cached)["links"]}
    for server, protocol in (("192.0.2.10", "tcp"), ("192.0.2.11", "tcp"),
                             ("192.0.2.10", "udp")):
        for direction in ("forward", "reverse"):
            want = expected(rows, server, protocol, direction)
            got = links[server, protocol]["summary"][direction]
            for key in ("count", "ok", "failed", "min_bps", "max_bps", "retransmits"):
                if key in want:
                    assert got[key] == want[key], (server, protocol, direction, key)
            for key in ("median_bps", "p5_bps", "p95_bps", "median_rtt_ms", "bytes"):
                if key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-12, abs=0), key


def test_a_cache_that_cannot_be_written_costs_only_time(grown):
    folder, _ = grown
    (folder / CACHE_DIR).write_text("not a folder")
    assert report(folder, "--format", "json") == whole(folder, "--format", "json")
    assert (folder / CACHE_DIR).read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the report run as root")
def test_another_users_report_writes_no_cache_and_none_through_a_symlink(grown,
                                                                         tmp_path_factory):
    """Root's report in a user's folder would write where that user can swap a name for a
    symbolic link: it writes no cache there. Nor does the owner's, through a symlink."""
    folder, _ = grown
    os.chown(str(folder), 65534, 65534)
    assert report(folder, "--format", "json") == whole(folder, "--format", "json")
    assert not (folder / CACHE_DIR).exists()
    os.chown(str(folder), 0, 0)
    victim = tmp_path_factory.mktemp("victim")
    for number in range(20):
        (victim / ("%020x" % number)).write_text("keep me")
    (folder / CACHE_DIR).symlink_to(victim)
    assert report(folder, "--format", "json") == whole(folder, "--format", "json")
    assert sorted(os.listdir(str(victim))) == ["%020x" % number for number in range(20)]


def test_a_cache_is_one_time_zones(tmp_path):
    """Timestamps without a UTC offset (a hand's edit) are read in local time: a cache
    written under one TZ is not believed under another."""
    write(tmp_path, [dict(row, timestamp=row["timestamp"][:19])
                     for row in generated_rows(random.Random(11), runs=1050)])
    utc, new_york = {"TZ": "UTC"}, {"TZ": "America/New_York"}
    for env in (utc, new_york, utc):
        done = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path], env=env)
        cold = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path, "--no-cache"], env=env)
        assert done.stdout.split("\n")[:3] == cold.stdout.split("\n")[:3]
        assert ("05:00" in done.stdout) == (env is new_york)
    assert len(caches(tmp_path)) == 2


def test_lines_ended_by_a_lone_cr_are_rows(tmp_path):
    """A ledger saved with old Mac line ends (CR) after its header: each CR ends a row, as a
    text file read with newline="" splits, also at the end of a block read."""
    rows = generated_rows(random.Random(2), runs=1050)
    write(tmp_path, rows)
    lines = ledger_lines(tmp_path)
    write_lines(tmp_path, [lines[0]] + [line.replace("\n", "\r") for line in lines[1:]])
    data = json.loads(report(tmp_path, "--format", "json"))
    assert sum(link["summary"][direction]["count"] + link["summary"][direction]["skipped"]
               for link in data["links"] for direction in ("forward", "reverse")) == len(rows) - 1
    # The last: a CR that ends the file may be half of a CRLF being written; no row yet, as
    # a last line without its LF (2.2 read it so too).
