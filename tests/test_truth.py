"""Issue 19, "nothing false, nothing lost": old results' failures keep their link, a ledger a run
cannot append to loses no test, links that come and go, folders given twice, UDP-only checks,
byte order marks, long host names, and the smaller items (cut rows, control characters, bad
--targets files). Real iperf3 on loopback where it can show the case; a fake one only for many
quick runs and for what a real one cannot do (break the ledger mid-run)."""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import iperf_client
from conftest import (BASE_ROW, CANNOT_CONNECT, CLIENT_SCRIPT, FAKE_RESULT, LEDGER_COLUMNS, QUICK,
                      assert_one_line_error, paced, read_ledger, row_at, run_script, says,
                      write_ledger)

ONE_STREAM = [*QUICK, "-P", "1"]
THRESHOLDS = ("--warn-below", "5000", "--crit-below", "1000")  # Mbit/s


def run_client(folder, *args, env=None):
    return run_script(CLIENT_SCRIPT, paced([*ONE_STREAM, "-d", folder, *args]), env=env)


def report(*args):
    return run_script(CLIENT_SCRIPT, ["report", *args])


def check(capsys, *args):
    """The check in-process: (exit code, its one status line)."""
    code = iperf_client.main(["report", "--check", *[str(arg) for arg in args]])
    out, _ = capsys.readouterr()
    assert len(out.splitlines()) == 1, out
    return code, out.rstrip("\n")


def json_files(folder):
    return sorted(name for name in os.listdir(str(folder)) if ".json" in name)


def as_the_original_left_it(folder):
    """Make a folder what the original script left: its files as iperf3 wrote them (our
    metadata taken out), no ledger, no run logs."""
    for name in os.listdir(str(folder)):
        path = folder / name
        if name.endswith(".json"):
            document = json.loads(path.read_text())
            document.pop("continuous_iperf")
            path.write_text(json.dumps(document, indent=1))
        else:
            path.unlink()


# --- 1. failed tests whose files name no server -------------------------------------------------

def test_rebuilt_failures_of_old_files_keep_their_link(tmp_path, start_iperf3_server, capsys):
    """The original's `lab_<ts>_client.json` / `_server.json`: a run against a live server, one
    against it stopped (iperf3's own JSON of a refused connection names no server), rebuilt."""
    folder = tmp_path / "results"
    server = start_iperf3_server()
    assert run_client(folder, "-c", "127.0.0.1", "-p", server.port, "--prefix", "lab_"
                      ).returncode == 0
    server.stop()
    time.sleep(1.1)  # the next run's own second
    failed = run_client(folder, "-c", "127.0.0.1", "-p", server.port, "--prefix", "lab_")
    assert failed.returncode == 1
    as_the_original_left_it(folder)
    refused = json.loads((folder / json_files(folder)[-1]).read_text())
    assert refused["start"]["connected"] == [] and "connecting_to" not in refused["start"]
    assert says(refused["error"], CANNOT_CONNECT + ("Connection refused",))
    done = report("-d", folder, "--rebuild", "--format", "csv")
    assert done.returncode == 0, done.stderr
    rows = read_ledger(folder)
    assert [(row["status"], row["server"], row["port"]) for row in rows] == [
        ("ok", "127.0.0.1", str(server.port))] * 2 + [
        ("error", "127.0.0.1", str(server.port))] * 2
    # The link's failures are its own: --server counts them, --check sees its latest failed.
    one = report("-d", folder, "--server", "127.0.0.1:%d" % server.port, "--format", "csv")
    assert [line.split(",")[8] for line in one.stdout.splitlines()[1:]] == [
        "ok", "ok", "error", "error"]
    code, line = check(capsys, "-d", folder, *THRESHOLDS, "--max-age", "60")
    assert code == 2 and "forward test failed" in line, line
    assert ":" not in line.split(" | ")[1].split("=")[0], line


def test_a_failed_test_takes_its_runs_other_test_server_else_stays_unknown(
        tmp_path, start_iperf3_server, capsys):
    """A prefix that names two servers: a run's failed reverse test takes its forward test's
    server; a run whose both tests failed is "server unknown" (never a link ":")."""
    first, second = start_iperf3_server(), start_iperf3_server()
    folder = tmp_path / "results"
    for server in (first, second):
        assert run_client(folder, "-c", "127.0.0.1", "-p", server.port).returncode == 0
        time.sleep(1.1)
    second.stop()
    assert run_client(folder, "-c", "127.0.0.1", "-p", second.port).returncode == 1
    as_the_original_left_it(folder)
    names = json_files(folder)
    # A run whose forward test went through and whose reverse one was refused.
    shutil.copy(str(folder / names[2]), str(folder / "20200101_000000_client.json"))
    shutil.copy(str(folder / names[5]), str(folder / "20200101_000000_server.json"))
    assert report("-d", folder, "--rebuild").returncode == 0
    rows = {row["file"]: row for row in read_ledger(folder)}
    assert (rows["20200101_000000_server.json"]["status"],
            rows["20200101_000000_server.json"]["server"],
            rows["20200101_000000_server.json"]["port"]) == ("error", "127.0.0.1",
                                                             str(second.port))
    assert [rows[name]["server"] for name in names[4:]] == ["", ""]  # ambiguous
    links = iperf_client.group_links(iperf_client.fill_clients(
        iperf_client.read_ledger(str(folder / "results.csv"))))
    assert sorted(iperf_client.link_names(links).values()) == sorted([
        "127.0.0.1:%d" % first.port, "127.0.0.1:%d" % second.port, "server unknown"])
    code, line = check(capsys, "-d", folder, *THRESHOLDS)
    assert "server unknown: " in line and " :" not in line, line
    assert not any(item.startswith("_") for item in line.split(" | ")[1].split()), line


# --- 2. a ledger the run cannot append to ---------------------------------------------------------

def assert_every_test_measured(done, folder, tests, *fragments):
    assert_one_line_error(done, 73, "cannot append to the ledger", *fragments)
    assert "report --rebuild" in done.stderr
    assert len(json_files(folder)) == tests


def test_a_symlinked_ledger_still_gets_every_test_measured(tmp_path, start_iperf3_server):
    folder = tmp_path / "results"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere.csv"
    elsewhere.write_text(iperf_client.csv_line(iperf_client.LEDGER_COLUMNS))
    (folder / "results.csv").symlink_to(elsewhere)
    first, second = start_iperf3_server(), start_iperf3_server()
    done = run_client(folder, "-c", "127.0.0.1:%d" % first.port,
                      "-c", "127.0.0.1:%d" % second.port)
    assert_every_test_measured(done, folder, 4, "symbolic link")
    assert elsewhere.read_text() == iperf_client.csv_line(iperf_client.LEDGER_COLUMNS)
    os.unlink(str(folder / "results.csv"))
    assert report("-d", folder, "--rebuild").returncode == 0
    assert [row["status"] for row in read_ledger(folder)] == ["ok"] * 4


def test_a_directory_named_like_the_ledger(tmp_path, iperf3_server):
    folder = tmp_path / "results"
    (folder / "results.csv").mkdir(parents=True)
    done = run_client(folder, "-c", "127.0.0.1", "-p", iperf3_server.port)
    assert_every_test_measured(done, folder, 2, "directory")


def test_a_ledger_that_breaks_mid_run_loses_no_later_test(tmp_path, fake_iperf3):
    """The ledger turns into a directory after the first test: the three other tests still
    run (a fake iperf3 does the damage: no real one can)."""
    folder = tmp_path / "results"
    fake = fake_iperf3(FAKE_RESULT + """
ledger = %r
if os.path.isfile(ledger):
    os.rename(ledger, ledger + ".moved")
    os.mkdir(ledger)
print(json.dumps(doc))
""" % str(folder / "results.csv"))
    done = run_client(folder, "--iperf3", fake, "-c", "h1", "-c", "h2")
    assert_every_test_measured(done, folder, 4, "directory")
    with open(str(folder / "results.csv.moved")) as handle:
        assert len(list(csv.reader(handle))) == 2  # the header and the first test


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def python_for_nobody():
    """A Python that user nobody can start: this one, else the system's (a virtual environment
    or a pyenv build under root's 0700 home is out of nobody's reach). The client script is
    what the test is about, not the interpreter's version."""
    for python in (sys.executable, "/usr/bin/python3"):
        done = subprocess.run(AS_NOBODY + [python, "-c", "pass"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        if done.returncode == 0:
            return python
    pytest.fail("user nobody can run neither %s nor /usr/bin/python3" % sys.executable)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv not available")
def test_a_root_owned_ledger_run_as_another_user(iperf3_server):
    """root's `report --rebuild` replaced the ledger: the cron user's next run. The rebuild now
    gives the ledger back to its owner; a ledger root took anyway is said, and costs no test."""
    base = tempfile.mkdtemp(prefix="truth-")  # nobody must reach it: not under pytest's 0700
    try:
        os.chmod(base, 0o755)
        folder = os.path.join(base, "results")
        os.mkdir(folder)
        os.chown(folder, 65534, 65534)
        # A copy nobody can read: the checkout may lie in a folder only root can enter.
        script = shutil.copy(str(CLIENT_SCRIPT), os.path.join(base, "iperf_client.py"))
        as_nobody = AS_NOBODY + [python_for_nobody(), script, *paced([
            *ONE_STREAM, "-d", folder, "-c", "127.0.0.1", "-p", iperf3_server.port])]

        def run_as_nobody():
            return subprocess.run(as_nobody, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True, timeout=60)

        done = run_as_nobody()
        assert done.returncode == 0, done.stderr
        assert report("-d", folder, "--rebuild").returncode == 0  # as root
        assert os.stat(os.path.join(folder, "results.csv")).st_uid == 65534
        time.sleep(1.1)
        done = run_as_nobody()
        assert done.returncode == 0, done.stderr
        ledger = os.path.join(folder, "results.csv")
        os.chown(ledger, 0, 0)
        os.chmod(ledger, 0o644)
        time.sleep(1.1)
        done = run_as_nobody()
        assert_every_test_measured(done, folder, 6, "Permission denied", "chown 65534:65534")
    finally:
        shutil.rmtree(base)


# --- 3. links that stopped being tested ---------------------------------------------------------

def moved(row, server):
    return dict(row, server=server)


def every_five_minutes(days, end_age=60):
    now = time.time()
    count = int(days * 288)
    rows = []
    for index in range(count):
        moment = now - end_age - (count - 1 - index) * 300
        rows += [row_at(moment, "forward", 9.4e9), row_at(moment + 30, "reverse", 8.9e9,
                                                          run_at=moment)]
    return rows


@pytest.mark.parametrize("days", [3, 0.05])
def test_a_removed_target_drops_out_of_the_check_after_a_day(tmp_path, capsys, days):
    """A target removed 2 days ago, its last test failed; the other link tested every 5 min
    (3 days of rows: fewer than the check's first read, or a small ledger)."""
    now = time.time()
    gone = [moved(row_at(now - 2 * 86400 - 600, "forward", error="refused"), "192.0.2.99"),
            moved(row_at(now - 2 * 86400 - 570, "reverse", error="refused"), "192.0.2.99")]
    write_ledger(tmp_path, gone + every_five_minutes(days))
    code, line = check(capsys, "-d", tmp_path, *THRESHOLDS)
    assert code == 0 and "192.0.2.99" not in line, line
    code, line = check(capsys, "-d", tmp_path, "--drop-below", "80,60", "--recent", "1",
                       "--consecutive", "1")
    assert "192.0.2.99" not in line, line


def test_a_client_that_stopped_stays_critical(tmp_path, capsys):
    """Every link stale (the client's cron died): the check still judges them, CRITICAL; so is
    a removed target that --server names on its own."""
    now = time.time()
    gone = [moved(row_at(now - 5 * 86400 - 600, "forward", 9e9), "192.0.2.99"),
            moved(row_at(now - 5 * 86400 - 570, "reverse", 9e9), "192.0.2.99")]
    write_ledger(tmp_path, gone + every_five_minutes(0.05, end_age=3 * 86400))
    code, line = check(capsys, "-d", tmp_path, *THRESHOLDS)
    assert code == 2 and "old (max" in line and "192.0.2.99" not in line, line
    write_ledger(tmp_path, gone + every_five_minutes(0.05))
    code, line = check(capsys, "-d", tmp_path, *THRESHOLDS, "--server", "192.0.2.99")
    assert code == 2 and "old (max" in line, line


def test_a_fifo_named_like_the_ledger_is_said_not_waited_for(tmp_path):
    os.mkfifo(str(tmp_path / "results.csv"))
    problem = iperf_client.ledger_problem(str(tmp_path / "results.csv"))
    assert "not a regular file" in problem and "report --rebuild" in problem


# --- 4. a folder given twice --------------------------------------------------------------------

def test_the_same_folder_twice_is_read_once(tmp_path):
    folder = tmp_path / "A"
    write_ledger(folder, every_five_minutes(0.05))
    (tmp_path / "link").symlink_to(folder)
    once = report("-d", folder, "--format", "csv")
    for again in (str(folder) + "/", tmp_path / "link", tmp_path / "A" / ".." / "A"):
        twice = report("-d", folder, "-d", again, "--format", "csv")
        assert twice.returncode == 0 and twice.stdout == once.stdout
        assert "given already" in twice.stderr and len(twice.stderr.splitlines()) == 1


# --- 5. a UDP-only folder checked by TCP thresholds -------------------------------------------

def udp_rows(count=6, lost="0.5"):
    rows = []
    for row in every_five_minutes(count / 288.0):
        row.update(protocol="udp", jitter_ms="0.1", lost_percent=lost, lost_packets="1",
                   packets="200")
        rows.append(row)
    return rows


@pytest.mark.parametrize("thresholds", [THRESHOLDS, ("--drop-below", "80,60"),
                                        ("--rtt-rise", "50,100")])
def test_a_udp_only_folder_checked_by_tcp_thresholds_is_unknown(tmp_path, capsys, thresholds):
    write_ledger(tmp_path, udp_rows())
    code, line = check(capsys, "-d", tmp_path, *thresholds)
    assert code == 3 and line.startswith("UNKNOWN - no TCP link"), line
    assert "--warn-loss" in line
    code, line = check(capsys, "-d", tmp_path, "--warn-loss", "1", "--crit-loss", "5")
    assert code == 0, line


def test_a_failed_udp_test_stays_critical_under_tcp_thresholds(tmp_path, capsys):
    rows = udp_rows()
    rows[-1].update(status="error", error="refused", lost_percent="", received_bps="")
    write_ledger(tmp_path, rows)
    code, line = check(capsys, "-d", tmp_path, *THRESHOLDS)
    assert code == 2 and line.startswith("CRITICAL - no TCP link"), line


# --- 7. a byte order mark -------------------------------------------------------------------------

def with_bom(path):
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


@pytest.mark.parametrize("columns", [iperf_client.BASE_COLUMNS, iperf_client.LEDGER_COLUMNS])
def test_a_ledger_with_a_byte_order_mark(tmp_path, fake_iperf3, capsys, columns):
    folder = tmp_path / "results"
    folder.mkdir()
    ledger = folder / "results.csv"
    row = BASE_ROW + [""] * (len(columns) - len(BASE_ROW))
    ledger.write_text(iperf_client.csv_line(columns) + iperf_client.csv_line(row))
    with_bom(ledger)
    done = report("-d", folder, "--format", "csv")
    assert done.returncode == 0 and done.stdout.count("\n") == 2, done.stderr
    code, line = check(capsys, "-d", folder, *THRESHOLDS)
    assert "damaged" not in line, line
    fake = fake_iperf3(FAKE_RESULT + "print(json.dumps(doc))")
    assert run_client(folder, "--iperf3", fake, "-c", "h1").returncode == 0
    rows = iperf_client.read_ledger(str(ledger))
    assert [(r[iperf_client.Col.SERVER], r[iperf_client.Col.PROTOCOL]) for r in rows] == [
        ("h", ""), ("h1", "tcp"), ("h1", "tcp")]
    assert all(len(r) == len(LEDGER_COLUMNS) for r in rows)


def test_a_targets_file_with_a_byte_order_mark(tmp_path):
    targets = tmp_path / "targets"
    targets.write_text("h1 first\nh2\n")
    with_bom(targets)
    done = run_client(tmp_path, "--targets", targets, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert [line.split()[2] for line in done.stdout.splitlines()] == ["h1", "h1", "h2", "h2"]


# --- 8. a long host name --------------------------------------------------------------------------

def test_a_long_host_name_makes_no_file_name_too_long(tmp_path, fake_iperf3):
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 51])  # 243 characters: valid DNS
    also_long = longest[:-1] + "e"
    fake = fake_iperf3(FAKE_RESULT + "print(json.dumps(doc))")
    done = run_client(tmp_path, "--iperf3", fake, "-c", longest, "-c", "%s:5202" % also_long,
                      "--prefix", "p" * 40, "--compress")
    assert done.returncode == 0, done.stderr
    rows = read_ledger(tmp_path)
    assert len(rows) == 4 and len({row["label"] for row in rows}) == 2
    for row in rows:
        assert os.path.isfile(str(tmp_path / row["file"])), row["file"]
        assert len(row["label"]) <= 64 and len(row["file"].encode()) < 255
        assert iperf_client.LABEL_RE.match(row["label"])
    # A label cut by default_label is still the default one: links are named by host:port.
    links = iperf_client.group_links(iperf_client.fill_clients(
        iperf_client.read_ledger(str(tmp_path / "results.csv"))))
    assert sorted(iperf_client.link_names(links).values()) == sorted([
        "%s:5201" % longest, "%s:5202" % also_long])


# --- 9. the smaller ones --------------------------------------------------------------------------

def test_the_upgrade_keeps_a_quoted_cell_that_spans_lines(tmp_path, fake_iperf3):
    folder = tmp_path / "results"
    folder.mkdir()
    spanning = list(BASE_ROW)
    spanning[8:10] = ["error", "refused,\nby the server"]
    (folder / "results.csv").write_text("".join(iperf_client.csv_line(cells) for cells in (
        iperf_client.BASE_COLUMNS, spanning, BASE_ROW)))
    fake = fake_iperf3(FAKE_RESULT + "print(json.dumps(doc))")
    done = run_client(folder, "--iperf3", fake, "-c", "h1")
    assert done.returncode == 0, done.stderr
    rows = read_ledger(folder)
    assert [row["error"] for row in rows] == ["refused,\nby the server", "", "", ""]
    assert report("-d", folder, "--format", "csv").returncode == 0


def test_a_row_cut_inside_its_last_number_is_no_row(tmp_path):
    row = dict(row_at(time.time() - 60, "forward", 1e6), protocol="udp", lost_percent="0",
               jitter_ms="0.1", lost_packets="0", packets="39")
    write_ledger(tmp_path, [row, row])
    ledger = tmp_path / "results.csv"
    ledger.write_bytes(ledger.read_bytes()[:-2])  # "...,39\n" -> "...,3"
    assert len(iperf_client.read_ledger(str(ledger))) == 1
    rows, whole = iperf_client.read_ledger_tail(str(ledger), 10)
    assert len(rows) == 1
    iperf_client.append_ledger(str(ledger), [row.get(column, "") for column in LEDGER_COLUMNS])
    assert [r[iperf_client.Col.PACKETS] for r in iperf_client.read_ledger(str(ledger))] == [
        "39", "39"]


def test_a_udp_rate_too_low_to_measure_is_refused(tmp_path):
    done = run_client(tmp_path, "-c", "h1", "--udp", "1K", "--dry-run")
    assert_one_line_error(done, 2, "--udp", "datagrams")
    assert run_client(tmp_path, "-c", "h1", "--udp", "2M", "--dry-run").returncode == 0


def test_control_characters_never_reach_the_report_or_the_check(tmp_path, capsys):
    rows = every_five_minutes(0.05)
    rows[-1].update(status="error", error="boom\x1b[31m red\x07", received_bps="")
    write_ledger(tmp_path, rows)
    text = report("-d", tmp_path)
    assert text.returncode == 0 and "\x1b" not in text.stdout and "\x07" not in text.stdout
    assert "\\x1b[31m red\\x07" in text.stdout
    code, line = check(capsys, "-d", tmp_path, *THRESHOLDS)
    assert code == 2 and "\x1b" not in line and "\x07" not in line, line


def test_a_zero_baseline_gives_no_infinite_percentage(tmp_path, capsys):
    rows = every_five_minutes(0.1)
    for row in rows[:-6]:
        row["received_bps"] = "0.0"
    write_ledger(tmp_path, rows)
    code, line = check(capsys, "-d", tmp_path, "--drop-below", "80,60")
    assert "inf" not in line and code == 3, line
    assert "forward_throughput_vs_7d=U" in line.split(" | ")[1].split()


@pytest.mark.parametrize("check_flags, code", [((), 2), (THRESHOLDS, 3)])
def test_since_after_until_is_refused(tmp_path, check_flags, code):
    write_ledger(tmp_path, every_five_minutes(0.05))
    done = report("-d", tmp_path, "--since", "2024-02-01", "--until", "2024-01-01",
                  *(("--check",) + check_flags if check_flags else ()))
    assert done.returncode == code and "Traceback" not in done.stderr
    assert "--since 2024-02-01 is not before --until 2024-01-01" in done.stderr + done.stdout


def test_a_fifo_or_a_device_as_targets_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    for path, why in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file")):
        done = run_client(tmp_path, "--targets", path, "--dry-run")
        assert_one_line_error(done, 2, "targets file", why)
    big = tmp_path / "big"
    big.write_text("h1\n" * 400000)
    assert_one_line_error(run_client(tmp_path, "--targets", big, "--dry-run"), 2, "larger")
