"""An operator's worst day, each case reproduced the way it was found: writes into devices and
FIFOs, a client killed with SIGKILL, a clock that jumped, a full disk, a ledger cut, edited or
written by a newer version. Nothing may be lost, nothing false, nothing damaged."""

import os
import stat
import subprocess
import sys
import threading

import pytest

from conftest import CLIENT_SCRIPT, SERVER_SCRIPT, run_script

sys.path.insert(0, str(CLIENT_SCRIPT.parent))
import iperf_client  # noqa: E402
from test_html import day_of_runs, write_ledger  # noqa: E402


# --- writes never damage what they replace --------------------------------------------------------

def report_html(folder, target):
    return run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--html", target])


@pytest.fixture
def ledger_folder(tmp_path):
    folder = tmp_path / "results"
    write_ledger(folder, day_of_runs())
    return folder


def test_a_character_device_is_written_into_not_replaced(ledger_folder, tmp_path):
    device = tmp_path / "null"
    os.mknod(str(device), stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    done = report_html(ledger_folder, device)
    assert (done.returncode, done.stderr) == (0, "")
    assert stat.S_ISCHR(os.lstat(str(device)).st_mode)


def test_a_fifo_with_a_reader_gets_the_page(ledger_folder, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    try:
        done = report_html(ledger_folder, fifo)
    finally:
        if reader.is_alive():  # the report failed before opening it: release the reader
            with open(str(fifo), "wb"):
                pass
        reader.join(10)
    assert (done.returncode, done.stderr) == (0, "")
    assert received[0].startswith(b"<!DOCTYPE html>")
    assert stat.S_ISFIFO(os.lstat(str(fifo)).st_mode)


def test_a_fifo_without_a_reader_is_an_error_not_a_hang(ledger_folder, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    done = report_html(ledger_folder, fifo)
    assert done.returncode == 1 and "no process reads" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and stat.S_ISFIFO(os.lstat(str(fifo)).st_mode)


def test_html_to_dev_stdout_prints_the_page(ledger_folder):
    done = subprocess.run([sys.executable, str(CLIENT_SCRIPT), "report", "-d",
                           str(ledger_folder), "--html", "/dev/stdout"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"<!DOCTYPE html>")


@pytest.mark.parametrize("kind", ["directory", "socket", "dangling symlink"])
def test_anything_else_that_is_not_a_regular_file_is_refused(ledger_folder, tmp_path, kind):
    target = tmp_path / "target"
    if kind == "directory":
        target.mkdir()
    elif kind == "socket":
        import socket
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        sock.close()
    else:
        target.symlink_to(tmp_path / "nowhere")
    before = os.lstat(str(target))
    done = report_html(ledger_folder, target)
    assert done.returncode == 1 and "not replaced" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert stat.S_IFMT(os.lstat(str(target)).st_mode) == stat.S_IFMT(before.st_mode)


def test_a_symlink_to_a_file_keeps_the_link_and_replaces_the_file(ledger_folder, tmp_path):
    real = tmp_path / "www" / "report.html"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "report.html"
    link.symlink_to(real)
    done = report_html(ledger_folder, link)
    assert (done.returncode, done.stderr) == (0, "")
    assert os.path.islink(str(link)) and real.read_text().startswith("<!DOCTYPE html>")


def test_the_prometheus_textfile_is_never_replaced_by_a_device(tmp_path, fake_iperf3):
    from test_client import FAKE_RESULT
    fake = fake_iperf3(FAKE_RESULT + "\nprint(json.dumps(doc))\n")
    device = tmp_path / "null"
    os.mknod(str(device), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    done = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", tmp_path / "r", "--iperf3", fake,
                                      "--prometheus-textfile", device])
    assert (done.returncode, done.stderr) == (0, "")
    assert stat.S_ISCHR(os.lstat(str(device)).st_mode)


def test_output_target_in_each_case(tmp_path):
    assert iperf_client.output_target(str(tmp_path / "new.html")) == (
        "replace", str(tmp_path / "new.html"))
    assert iperf_client.output_target("/dev/stdout")[0] == "stream"
    assert iperf_client.output_target("/proc/self/fd/1")[0] == "stream"
    with pytest.raises(OSError):
        iperf_client.output_target(str(tmp_path))


# --- no iperf3 outlives its client ----------------------------------------------------------------

def iperf3_clients_of(port):
    """PIDs of live iperf3 clients testing against `port` (read from /proc)."""
    from test_client import pids_with
    return pids_with("-c", "127.0.0.1", "-p", str(port))


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_sigkilled_client_leaves_no_iperf3_running(iperf3, start_iperf3_server, tmp_path,
                                                   delay):
    """Against a stopped server iperf3 waits for ever: only the kernel's parent-death signal
    can end it once the client is gone."""
    import signal
    import time
    from conftest import kill_process, wait_until
    server = start_iperf3_server()
    os.kill(server.proc.pid, signal.SIGSTOP)
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT_SCRIPT), "-c", "127.0.0.1", "-p", str(server.port), "-t",
         "60", "-d", str(tmp_path), "--iperf3", iperf3],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: iperf3_clients_of(server.port), timeout=10)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: not iperf3_clients_of(server.port), timeout=5), \
            "iperf3 outlived its SIGKILLed client"
    finally:
        kill_process(proc)
        for pid in iperf3_clients_of(server.port):
            os.kill(pid, signal.SIGKILL)
        os.kill(server.proc.pid, signal.SIGCONT)


# --- the ledger is read and salvaged by its header, with every row kept ---------------------------

def runs_with_a_fake(tmp_path, fake_iperf3, count=2):
    """A results folder of `count` real runs (a fake iperf3 printing a fixed result); returns
    it with its ledger's text."""
    from test_client import FAKE_RESULT
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


def test_a_last_line_cut_inside_the_file_column_is_no_row(tmp_path, fake_iperf3):
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
    assert all(line.endswith((".json", ".json.gz")) for line in lines[1:])
    assert any("cut short" in path.read_text() for path in folder.glob("*_iperf_mon.log"))
    assert rebuild(folder).returncode == 0
    assert len(ledger_lines(folder)) == 5  # the cut test's row comes back from its file


def test_a_file_and_its_gzip_twin_are_one_test(tmp_path, fake_iperf3):
    import gzip
    folder = runs_with_a_fake(tmp_path, fake_iperf3, count=1)
    whole = ledger_lines(folder)
    for path in folder.glob("*.json"):
        (folder / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))  # gzip -k
    assert rebuild(folder).returncode == 0
    assert ledger_lines(folder) == whole


def test_a_reordered_header_puts_the_figures_in_their_columns(tmp_path, fake_iperf3):
    import csv
    import json
    folder = runs_with_a_fake(tmp_path, fake_iperf3, count=1)
    with open(str(folder / "results.csv"), newline="") as handle:
        table = list(csv.reader(handle))
    sent, received = table[0].index("sent_bps"), table[0].index("received_bps")
    for row in table:  # swap the two columns, header included: the same ledger, reordered
        row[sent], row[received] = row[received], row[sent]
    with open(str(folder / "results.csv"), "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(table)
    done = run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--format", "json"])
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["runs"]
    assert [(run["sent_bps"], run["received_bps"]) for run in runs] == [
        (1000.5, 900.25), (1001.5, 901.25)]
    # A run continues the ledger in its own order.
    runs_with_a_fake(tmp_path, fake_iperf3, count=1)
    with open(str(folder / "results.csv"), newline="") as handle:
        appended = list(csv.DictReader(handle))[-1]
    assert (appended["sent_bps"], appended["received_bps"]) == ("1001.5", "901.25")


def test_a_newer_versions_extra_column_keeps_every_row_and_its_cells(tmp_path, fake_iperf3):
    import csv
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


# --- "latest" means the latest written ------------------------------------------------------------

def test_a_test_dated_in_the_future_does_not_hide_later_failures(tmp_path, capsys):
    """One run made while the clock was six days ahead, then failures at the right time."""
    import time
    from test_check import THRESHOLDS, check, runs
    from test_html import row
    now = time.time()
    rows = runs(count=4, age=1200)
    ahead = now + 6 * 86400
    rows += [row(ahead, "forward", 9.4e9), row(ahead + 30, "reverse", 8.9e9, run_at=ahead)]
    rows += [row(now - 120, "forward", error="unable to connect to server: refused"),
             row(now - 90, "reverse", error="unable to connect to server: refused",
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
    from test_check import THRESHOLDS, check, runs
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
    assert tail == [[one[c] for c in iperf_client.LEDGER_COLUMNS] for one in rows[-2000:]]


# --- a full disk: one line naming the path, the right exit code, what was measured kept ----------

@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs mounted in tmp_path (root only; unmounted afterwards)."""
    from conftest import require
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    require(done.returncode == 0, "a tmpfs mount (root)", "REQUIRE_NETNS")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def fill(folder, leave=0):
    """Fill the file system of `folder` but for about `leave` bytes."""
    path = str(folder / "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)
    if leave:
        os.truncate(path, max(0, os.path.getsize(path) - leave))


def no_traceback(text):
    return "Traceback" not in text and "Logging error" not in text


def test_client_on_a_full_disk_says_so_in_lines_naming_the_paths(small_disk, fake_iperf3):
    from test_client import FAKE_RESULT
    fake = fake_iperf3(FAKE_RESULT + "\nprint(json.dumps(doc))\n")
    results = small_disk / "r"
    results.mkdir()
    fill(small_disk)
    done = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", results, "--iperf3", fake])
    assert done.returncode == 1 and no_traceback(done.stderr), done.stderr
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, done.stderr
    assert all(str(results) in line and "No space left" in line for line in lines), lines


def test_a_result_too_big_for_the_disk_still_leaves_its_ledger_row(small_disk, fake_iperf3):
    """The disk fills during the run: the tests' rows are kept although their files are not."""
    from test_client import FAKE_RESULT
    fake = fake_iperf3(FAKE_RESULT + '\ndoc["intervals"] = ["x" * 60000]\nprint(json.dumps(doc))\n')
    results = small_disk / "r"
    results.mkdir()
    fill(small_disk, leave=12 * 1024)
    done = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", results, "--iperf3", fake])
    assert done.returncode == 1 and no_traceback(done.stderr), done.stderr
    assert "cannot write the result file" in done.stderr and str(results) in done.stderr
    rows = (results / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",ok," in row for row in rows[1:]), rows


def test_server_log_on_a_full_disk_is_one_warning_and_the_server_runs(small_disk, host):
    fill(small_disk)
    done = run_script(SERVER_SCRIPT, ["--pidfile", host.pidfile, "--log-file",
                                      small_disk / "monitor.log", "-p", host.port])
    assert done.returncode == 0 and no_traceback(done.stderr), done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left" in lines[0] and "monitor.log" in lines[0], lines
    assert host.daemons() == [host.pid()]


def test_server_names_a_full_pidfile_folder(small_disk, tmp_path, host):
    fill(small_disk)
    done = run_script(SERVER_SCRIPT, ["--pidfile", small_disk / "iperf.pid", "--log-file",
                                      host.log_file, "-p", host.port])
    assert done.returncode == 1 and no_traceback(done.stderr), done.stderr
    assert done.stderr.count("\n") == 1
    assert "cannot write the pidfile in %s: No space left" % small_disk in done.stderr


# --- the server changes settings without losing the server ----------------------------------------

def test_a_new_port_that_is_taken_keeps_the_working_daemon(host):
    import socket
    from conftest import assert_one_line_error, assert_quiet_success, free_port
    assert_quiet_success(host.run())
    pid = host.pid()
    taken = free_port()
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", taken))
    blocker.listen(1)
    try:
        done = host.run(port=taken)
    finally:
        blocker.close()
    assert_one_line_error(done, 1, "port %d is in use" % taken, "left as it is")
    assert host.daemons() == [pid] and host.pid() == pid


def test_an_unwritable_state_file_is_a_warning_not_a_failed_run(host):
    from conftest import assert_quiet_success
    assert_quiet_success(host.run())
    os.mkdir(host.pidfile + ".state.d")
    os.unlink(host.pidfile + ".state")
    os.rename(host.pidfile + ".state.d", host.pidfile + ".state")  # a directory: unwritable
    done = host.run()
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "untracked" in host.log()


def test_the_server_log_never_follows_a_planted_symlink(host, tmp_path):
    from conftest import assert_one_line_error
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    os.symlink(str(target), host.log_file)
    done = host.run()
    assert_one_line_error(done, 1, host.log_file)
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize("server", ["host\nname", "host\tname", "bad\x1bname"])
def test_a_server_name_with_control_characters_is_refused(tmp_path, server):
    from conftest import assert_one_line_error
    done = run_script(CLIENT_SCRIPT, ["--server", server, "-d", tmp_path / "r"])
    assert_one_line_error(done, 2, "control character")
    assert not (tmp_path / "r").exists()


def test_sigterm_during_a_rebuild_stops_it_in_one_line(tmp_path):
    """The rebuild reads files in worker processes: none may print a traceback."""
    import json
    import signal
    import time
    # About 150 KB of numbers in each file, which is parsed whole (no metadata of ours first).
    padding = [{"start": n + 0.25, "bytes": n * 1000, "sender": True} for n in range(3000)]
    for index in range(600):
        document = {"start": {"timestamp": {"timesecs": 1700000000 + index}},
                    "intervals": padding,
                    "end": {"sum_sent": {"bits_per_second": 1e6},
                            "sum_received": {"bits_per_second": 9e5}}}
        name = "20240101_%06d_client.json" % index
        (tmp_path / name).write_text(json.dumps(document))
    proc = subprocess.Popen([sys.executable, str(CLIENT_SCRIPT), "report", "-d", str(tmp_path),
                             "--rebuild"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    from conftest import wait_until

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


def test_iperf3s_version_banner_is_never_taken_for_a_refused_login(iperf3_server, tmp_path):
    """`-- -v` makes iperf3 print its banner ("... authentication ...") instead of a result."""
    done = run_script(CLIENT_SCRIPT, ["--server", "127.0.0.1", "--port", iperf3_server.port,
                                      "-t", "1", "-d", tmp_path, "--retries", "0", "--", "-v"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "printed no JSON result" in done.stderr
    assert "login" not in done.stderr and "authentication failed" not in done.stderr
