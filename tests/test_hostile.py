"""An operator's worst day, each case reproduced the way it was found: outputs written into
devices and FIFOs, a client killed with SIGKILL, a full disk. Nothing may be lost, nothing false,
nothing damaged. (The other hostile cases live with their areas: a cut or reordered ledger in
test_report, a clock that jumped in test_check, new settings that cannot work in test_server.)"""

import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import (CLIENT_SCRIPT, FAKE_RESULT, SERVER_SCRIPT, kill_process, pids_with, require,
                      row_at, run_script, wait_until, write_ledger)

import iperf_client


# --- writes never damage what they replace --------------------------------------------------------

def report_html(folder, target):
    return run_script(CLIENT_SCRIPT, ["report", "-d", folder, "--html", target])


@pytest.fixture
def ledger_folder(tmp_path):
    folder = tmp_path / "results"
    write_ledger(folder, [row_at(1764331200.0 + 900 * index, "forward", 9.4e9 + index * 1e7)
                          for index in range(20)])
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
    return pids_with("-c", "127.0.0.1", "-p", str(port))


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_sigkilled_client_leaves_no_iperf3_running(iperf3, start_iperf3_server, tmp_path,
                                                   delay):
    """Against a stopped server iperf3 waits for ever: only the kernel's parent-death signal
    can end it once the client is gone."""
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


# --- a full disk: one line naming the path, the right exit code, what was measured kept ----------

@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs mounted in tmp_path (root only; unmounted afterwards)."""
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
    fake = fake_iperf3(FAKE_RESULT + "\nprint(json.dumps(doc))\n")
    results = small_disk / "r"
    results.mkdir()
    fill(small_disk)
    done = run_script(CLIENT_SCRIPT, ["-c", "h.example", "-d", results, "--iperf3", fake])
    # 73: the ledger refused the rows; both tests still ran (issue 19).
    assert done.returncode == 73 and no_traceback(done.stderr), done.stderr
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 4, done.stderr
    assert "free space" in done.stderr
    assert all(str(results) in line and "No space left" in line for line in lines), lines


def test_a_result_too_big_for_the_disk_still_leaves_its_ledger_row(small_disk, fake_iperf3):
    """The disk fills during the run: the tests' rows are kept although their files are not."""
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
