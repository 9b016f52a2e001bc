"""How iperf_client.py creates and appends its files: whole ledger rows only, modes that are
never world-writable, no symlink followed, and readable errors for unreadable secrets."""

import csv
import errno
import os
import stat
import subprocess
import sys

import pytest

import iperf_client
from conftest import CLIENT_SCRIPT, assert_one_line_error

ROW = ["2026-01-01T00:00:00+00:00", "20260101_000000", "", "forward", "h", "5201", "2", "1", "ok",
       "", "1.5", "1.25", "0", "1", "20260101_000000_client.json"]  # in LEDGER_COLUMNS order


def ledger_rows(path):
    with open(str(path), newline="") as handle:
        return list(csv.reader(handle))


def test_append_after_a_last_line_without_newline_keeps_both_rows(tmp_path):
    ledger = tmp_path / "results.csv"
    iperf_client.append_ledger(str(ledger), ROW)
    ledger.write_bytes(ledger.read_bytes().rstrip(b"\n"))  # as an editor may save it
    reverse = list(ROW)
    reverse[iperf_client.Col.DIRECTION] = "reverse"
    iperf_client.append_ledger(str(ledger), reverse)
    rows = ledger_rows(ledger)
    assert [row[iperf_client.Col.DIRECTION] for row in rows[1:]] == ["forward", "reverse"]
    assert all(len(row) == len(iperf_client.LEDGER_COLUMNS) for row in rows)


def test_a_short_write_is_cut_back_off(tmp_path, monkeypatch):
    """A full disk: the first write takes 10 bytes, the next fails. No half row stays."""
    ledger = tmp_path / "results.csv"
    iperf_client.append_ledger(str(ledger), ROW)
    before = ledger.read_bytes()
    real_write = os.write
    calls = []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(iperf_client.os, "write", full_disk)
    with pytest.raises(OSError):
        iperf_client.append_ledger(str(ledger), ROW)
    monkeypatch.undo()
    assert len(calls) == 2
    assert ledger.read_bytes() == before


def test_planted_symlinks_are_not_followed(tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    for name in ("results.csv", "run_iperf_mon.log"):
        (tmp_path / name).symlink_to(target)
    with pytest.raises(OSError):
        iperf_client.append_ledger(str(tmp_path / "results.csv"), ROW)
    with pytest.raises(OSError):
        iperf_client.open_log(str(tmp_path / "run_iperf_mon.log"))
    assert target.read_text() == "precious\n"


def test_nothing_is_world_writable_even_with_umask_0(tmp_path, fake_iperf3):
    fake = fake_iperf3("""
        print(json.dumps({"start": {}, "end": {"sum_sent": {"bits_per_second": 1.0},
                                               "sum_received": {"bits_per_second": 1.0}}}))
    """)
    results = tmp_path / "results"
    done = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$@"', "sh", sys.executable, str(CLIENT_SCRIPT),
         "--server", "127.0.0.1", "-t", "1", "-P", "1", "-d", str(results), "--iperf3", str(fake)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    paths = [results] + [results / name for name in os.listdir(str(results))]
    assert len(paths) >= 5
    for path in paths:
        assert not stat.S_IMODE(os.stat(str(path)).st_mode) & 0o002, path


def test_password_file_that_is_not_text(tmp_path):
    password_file = tmp_path / "password"
    password_file.write_bytes(b"pa\xffss\n")
    os.chmod(str(password_file), 0o600)
    key = tmp_path / "public.pem"
    key.write_text("not checked in a dry run\n")
    done = subprocess.run([sys.executable, str(CLIENT_SCRIPT), "--server", "127.0.0.1",
                           "--username", "u", "--rsa-public-key-path", str(key),
                           "--password-file", str(password_file), "--dry-run"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert_one_line_error(done, 2, "not UTF-8", str(password_file))


def write_ledger(path, header, rows, extra_lines=()):
    lines = [",".join(header)] + [",".join(row) for row in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


def rebuild(folder):
    return subprocess.run([sys.executable, str(CLIENT_SCRIPT), "report", "-d", str(folder),
                           "--rebuild", "--format", "csv"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


@pytest.mark.parametrize("damage", ["header", "bad-line"])
def test_rebuild_salvages_rows_whose_files_are_gone(tmp_path, damage):
    """After --keep-days the ledger's old rows exist nowhere else: damage must not cost them."""
    rows = [[cell.replace("000000", "00000%d" % n) for cell in ROW] for n in range(6)]
    header = list(iperf_client.LEDGER_COLUMNS)
    if damage == "header":
        header[0] = "tmestamp"  # misspelled: the header no longer says where "timestamp" is
    ledger = tmp_path / "results.csv"
    write_ledger(ledger, header, rows, ["a,half,row"] if damage == "bad-line" else [])
    before = ledger.read_text()
    done = rebuild(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    kept = [row for row in ledger_rows(ledger)[1:]]
    assert kept == rows
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
