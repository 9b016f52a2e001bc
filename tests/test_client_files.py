"""How iperf_client.py creates and appends its files: whole ledger rows only, modes that are
never world-writable, no symlink followed."""

import csv
import errno
import os
import stat
import subprocess
import sys

import pytest

import iperf_client
from conftest import CLIENT_SCRIPT, ledger_cells, ledger_row

ROW = ledger_cells(ledger_row())


def ledger_rows(path):
    with open(str(path), newline="") as handle:
        return list(csv.reader(handle))


def test_append_after_a_last_line_without_newline_cuts_it(tmp_path, caplog, monkeypatch):
    """A row is whole only with its newline (issue 19: `...,3` may be `...,39` cut short): the
    line is cut off and said; its result file keeps it for --rebuild."""
    monkeypatch.setattr(iperf_client.log, "propagate", True)  # an in-process main() unset it
    ledger = tmp_path / "results.csv"
    iperf_client.append_ledger(str(ledger), ROW)
    ledger.write_bytes(ledger.read_bytes().rstrip(b"\n"))
    reverse = list(ROW)
    reverse[iperf_client.Col.DIRECTION] = "reverse"
    iperf_client.append_ledger(str(ledger), reverse)
    rows = ledger_rows(ledger)
    assert [row[iperf_client.Col.DIRECTION] for row in rows[1:]] == ["reverse"]
    assert all(len(row) == len(iperf_client.LEDGER_COLUMNS) for row in rows)
    assert "cut short" in caplog.text


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
