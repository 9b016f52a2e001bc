#!/usr/bin/env python3
"""Benchmark of `iperf_client.py report` at a year's scale (run by hand, not by pytest).

Generates its own data in a temporary folder and prints, side by side:

1. `report` (text) and `report --format json` over a ledger of 100,000 runs (200,000 rows),
   each a whole process with its output to a file, against a whole process that merely reads
   the same CSV with the csv module; best of three. Then (1b) text, json and --html over as
   many runs spread across 10 targets, against the same over one target (goal: within 1.5x).
2. `report --rebuild` over 2,000 realistic result files (30 streams x 60 one-second intervals,
   about 0.7 MB each, laid out as iperf3 writes them, with the client's metadata first) against
   `jq -r '.end.sum_received.bits_per_second'` over the same files; best of three.
3. The peak memory (max RSS) of each, and of the rebuild over half the files, to show that it
   does not grow with the number of files.
4. `report --check` over a ledger of 500,000 runs (1,000,000 rows) and over one of 5,000 runs,
   against a whole process that only starts Python: it reads the ledger's end only, so neither
   its time nor its memory grows with the ledger (goal: under 0.2 s and 50 MB).

Usage: python3 tests/benchmarks/bench_report.py [--runs 100000] [--files 2000]
       [--check-runs 500000] [--keep DIR]
"""

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT = os.path.join(ROOT, "iperf_client.py")
sys.path.insert(0, ROOT)
import iperf_client  # noqa: E402

BARE_READ = ("import csv, sys\n"
             "with open(sys.argv[1], newline='') as f:\n"
             "    rows = list(csv.reader(f))\n")


def measure(argv, stdout_path, repeat=3, codes=(0,)):
    """Best wall time (s) of `repeat` runs of argv with stdout to a file, and the peak RSS (MB);
    an exit code not in `codes` stops the benchmark."""
    best, peak = float("inf"), 0
    for _ in range(repeat):
        with open(stdout_path, "wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status) if hasattr(
                os, "waitstatus_to_exitcode") else status >> 8
            error = proc.stderr.read().decode()
            proc.stderr.close()
        if proc.returncode not in codes:
            raise SystemExit("%s failed (%s): %s" % (" ".join(argv), proc.returncode, error))
        best = min(best, elapsed)
        peak = max(peak, usage.ru_maxrss / 1024.0)
    return best, peak


def make_ledger(folder, runs, rng, targets=1):
    """A ledger of `runs` runs every 5 minutes, ending now; 2% failed tests. With several
    `targets`, the runs take turns among them (as many rows, spread over as many links)."""
    start = time.time() - runs * 300
    with open(os.path.join(folder, iperf_client.LEDGER_NAME), "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(iperf_client.LEDGER_COLUMNS)
        for index in range(runs):
            moment = start + index * 300
            run_ts = time.strftime(iperf_client.TIMESTAMP_FORMAT, time.localtime(moment))
            target = index % targets
            server, label = "192.0.2.%d" % (10 + target), "dc%d" % target if targets > 1 else ""
            for offset, direction, suffix in ((1, "forward", "_client.json"),
                                              (63, "reverse", "_server.json")):
                ok = rng.random() > 0.02
                received = rng.uniform(2e8, 9.4e8) if ok else None
                rtt = rng.uniform(0.2, 5.0) if ok and direction == "forward" else None
                cells = {
                    "timestamp": iperf_client.iso_time(moment + offset), "run": run_ts,
                    "direction": direction, "server": server, "port": 5201, "streams": 30,
                    "duration": 60, "status": "ok" if ok else "error",
                    "error": "" if ok else "unable to connect to server: Connection refused",
                    "sent_bps": repr(received * 1.01) if ok else "",
                    "received_bps": repr(received) if ok else "",
                    "retransmits": rng.randint(0, 3000) if ok else "", "attempts": 1,
                    "file": run_ts + ("_" + label if label else "") + suffix,
                    "client": "bench", "label": label or server, "protocol": "tcp",
                    "min_rtt_ms": repr(rtt) if rtt else "",
                    "mean_rtt_ms": repr(rtt * 1.8) if rtt else ""}
                writer.writerow([cells.get(column, "") for column in iperf_client.LEDGER_COLUMNS])


def interval(rng, second, streams):
    rows = [{"socket": 5 + 2 * i, "start": second, "end": second + 1.000041,
             "seconds": 1.000041, "bytes": rng.randint(10 ** 6, 10 ** 8),
             "bits_per_second": rng.uniform(1e7, 1e9), "retransmits": rng.randint(0, 9),
             "snd_cwnd": rng.randint(10 ** 5, 10 ** 6), "snd_wnd": 3145728,
             "rtt": rng.randint(100, 900), "rttvar": rng.randint(10, 90), "pmtu": 1500,
             "omitted": False, "sender": True} for i in range(streams)]
    return {"streams": rows, "sum": {"start": second, "end": second + 1.000041,
                                     "seconds": 1.000041, "bytes": 123456789,
                                     "bits_per_second": 9.87e8, "retransmits": 12,
                                     "omitted": False, "sender": True}}


def end_object(rng, streams, received):
    def side(sender, bps):
        return {"socket": 5, "start": 0, "end": 60.000143, "seconds": 60.000143,
                "bytes": int(bps * 7.5), "bits_per_second": bps, "sender": sender}
    per = [{"sender": dict(side(True, received / streams * 1.01), retransmits=7, max_snd_cwnd=1,
                           max_snd_wnd=3145728, max_rtt=900, min_rtt=100, mean_rtt=400),
            "receiver": side(True, received / streams)} for _ in range(streams)]
    return {"streams": per,
            "sum_sent": dict(side(True, received * 1.01), retransmits=rng.randint(0, 3000)),
            "sum_received": side(True, received),
            "cpu_utilization_percent": {"host_total": 12.5, "host_user": 1.2,
                                        "host_system": 11.3, "remote_total": 20.1,
                                        "remote_user": 2.0, "remote_system": 18.1},
            "sender_tcp_congestion": "cubic", "receiver_tcp_congestion": "cubic"}


def make_files(folder, count, rng, streams=30, seconds=60):
    """`count` result files as the client writes them, laid out (tabs) as iperf3 prints JSON.

    The 60 x 30 interval records are generated once and shared (their content does not matter
    to either reader; their size does); what the ledger reads differs in every file.
    """
    intervals = json.dumps([interval(rng, s, streams) for s in range(seconds)], indent="\t")
    connected = [{"socket": 5 + 2 * i, "local_host": "192.0.2.20", "local_port": 40000 + i,
                  "remote_host": "192.0.2.10", "remote_port": 5201} for i in range(streams)]
    start = time.time() - count * 300
    expected = {}
    for index in range(count // 2):
        moment = int(start + index * 300)
        run_ts = time.strftime(iperf_client.TIMESTAMP_FORMAT, time.localtime(moment))
        for reverse, (direction, suffix) in enumerate((("forward", "_client.json"),
                                                       ("reverse", "_server.json"))):
            name = run_ts + suffix
            meta = {"version": iperf_client.__version__, "run": run_ts, "prefix": "",
                    "direction": direction, "server": "192.0.2.10", "port": 5201,
                    "streams": streams, "duration": seconds, "attempts": 1,
                    "start": moment + 63 * reverse, "command": "iperf3 -c 192.0.2.10 -J",
                    "exit_code": 0}
            if rng.random() < 0.02:  # a failed test: a small file
                text = json.dumps({"continuous_iperf": meta, "start": {"connected": []},
                                   "intervals": [], "end": {},
                                   "error": "the server is busy running a test. try again "
                                            "later"}, indent="\t")
                expected[name] = ""
            else:
                received = rng.uniform(2e8, 9.4e8)
                stamp = {"time": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(moment)),
                         "timesecs": moment + 63 * reverse}
                test_start = {"protocol": "TCP", "num_streams": streams, "blksize": 131072,
                              "omit": 0, "duration": seconds, "bytes": 0, "blocks": 0,
                              "reverse": reverse, "tos": 0, "target_bitrate": 0}
                head = json.dumps({"continuous_iperf": meta, "start": {
                    "connected": connected, "version": "iperf 3.12",
                    "system_info": "Linux bench 6.1.0 #1 SMP x86_64", "timestamp": stamp,
                    "connecting_to": {"host": "192.0.2.10", "port": 5201},
                    "cookie": "abcdefghijklmnopqrstuvwxyz234567abcd", "tcp_mss_default": 1448,
                    "test_start": test_start}}, indent="\t")
                end = json.dumps(end_object(rng, streams, received), indent="\t")
                text = "%s,\n\t\"intervals\":\t%s,\n\t\"end\":\t%s\n}" % (
                    head[:-2], intervals, end)
                expected[name] = repr(received)
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(text + "\n")
    return expected


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100000, help="runs in the ledger")
    parser.add_argument("--files", type=int, default=2000, help="result files to rebuild from")
    parser.add_argument("--check-runs", type=int, default=500000,
                        help="runs in the ledger that --check reads")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    options = parser.parse_args()
    rng = random.Random(42)
    work = options.keep or tempfile.mkdtemp(prefix="bench-report-")
    os.makedirs(work, exist_ok=True)
    python = sys.executable
    jq_version = subprocess.run(["jq", "--version"], stdout=subprocess.PIPE,
                                universal_newlines=True).stdout.strip()
    print("machine: %d CPUs, Python %s, %s" % (os.cpu_count(), sys.version.split()[0],
                                               jq_version))
    try:
        ledger_dir = os.path.join(work, "ledger")
        os.makedirs(ledger_dir, exist_ok=True)
        make_ledger(ledger_dir, options.runs, rng)
        ledger = os.path.join(ledger_dir, iperf_client.LEDGER_NAME)
        print("\n1. report over %d runs (%d rows, %.1f MB of CSV), best of 3, output to a file"
              % (options.runs, 2 * options.runs, os.path.getsize(ledger) / 1e6))
        out = os.path.join(work, "out")
        bare, bare_mem = measure([python, "-c", BARE_READ, ledger], out)
        text, text_mem = measure([python, CLIENT, "report", "-d", ledger_dir], out)
        as_json, json_mem = measure([python, CLIENT, "report", "-d", ledger_dir, "--format",
                                     "json"], out)
        print("  %-36s %7s %9s %10s" % ("", "time", "vs bare", "peak RSS"))
        for label, seconds, memory in (("bare csv read (python -c)", bare, bare_mem),
                                       ("report (text)", text, text_mem),
                                       ("report --format json", as_json, json_mem)):
            print("  %-36s %6.2fs %8.2fx %7.0f MB" % (label, seconds, seconds / bare, memory))
        print("  goals: text < 1 s: %s; json < 1.5 s and < 4x bare: %s" % (
            "met" if text < 1 else "MISSED", "met" if as_json < 1.5 and as_json < 4 * bare
            else "MISSED"))

        links_dir = os.path.join(work, "links")
        os.makedirs(links_dir, exist_ok=True)
        make_ledger(links_dir, options.runs, rng, targets=10)
        print("\n1b. the same number of runs spread across 10 targets (a report per link), "
              "best of 3")
        print("  %-36s %7s %9s %10s" % ("", "time", "vs 1", "peak RSS"))
        ratios = []
        for label, extra, single in (("report (text)", [], text),
                                     ("report --format json", ["--format", "json"], as_json),
                                     ("report --html", ["--html", out + ".html"], None)):
            one = single
            if one is None:
                one, _ = measure([python, CLIENT, "report", "-d", ledger_dir] + extra, out)
            seconds, memory = measure([python, CLIENT, "report", "-d", links_dir] + extra, out)
            ratios.append(seconds / one)
            print("  %-36s %6.2fs %8.2fx %7.0f MB"
                  % (label + ", 10 links", seconds, seconds / one, memory))
        print("  goal: within 1.5x of one target: %s" % (
            "met" if max(ratios) <= 1.5 else "MISSED"))

        files_dir = os.path.join(work, "files")
        os.makedirs(files_dir, exist_ok=True)
        expected = make_files(files_dir, options.files, rng)
        names = sorted(expected)
        sizes = [os.path.getsize(os.path.join(files_dir, n)) for n in names]
        half_dir = os.path.join(work, "half")
        os.makedirs(half_dir, exist_ok=True)
        for name in names[:len(names) // 2]:
            target = os.path.join(half_dir, name)
            if not os.path.exists(target):
                os.link(os.path.join(files_dir, name), target)
        print("\n2. rebuild from %d result files (%.0f MB, %.2f MB average, largest %.2f MB), "
              "best of 3" % (len(names), sum(sizes) / 1e6, sum(sizes) / len(sizes) / 1e6,
                             max(sizes) / 1e6))
        paths = [os.path.join(files_dir, n) for n in names]
        jq, jq_mem = measure(["jq", "-r", ".end.sum_received.bits_per_second"] + paths, out)
        rebuild, rebuild_mem = measure([python, CLIENT, "report", "--rebuild", "-d", files_dir,
                                        "--format", "csv"], out)
        with open(os.path.join(files_dir, iperf_client.LEDGER_NAME), newline="") as handle:
            rows = {row["file"]: row for row in csv.DictReader(handle)}
        wrong = [n for n in names if rows[n]["received_bps"] != expected[n]
                 or rows[n]["status"] != ("ok" if expected[n] else "error")]
        single, single_mem = measure([python, "-c",
                                      "import sys; sys.path.insert(0, %r); import iperf_client;"
                                      " iperf_client.rebuild_ledger(%r, jobs=1)"
                                      % (ROOT, files_dir)], out)
        half, half_mem = measure([python, CLIENT, "report", "--rebuild", "-d", half_dir,
                                  "--format", "csv"], out, repeat=1)
        print("  %-36s %7s %9s %10s" % ("", "time", "jq/this", "peak RSS"))
        for label, seconds, memory in (
                ("jq -r .end.sum_received...", jq, jq_mem),
                ("report --rebuild (%d processes)" % (os.cpu_count() or 1), rebuild, rebuild_mem),
                ("rebuild_ledger, one process", single, single_mem),
                ("report --rebuild, half the files", half, half_mem)):
            print("  %-36s %6.2fs %8.1fx %7.0f MB" % (label, seconds, jq / seconds, memory))
        print("  rebuilt rows checked against the generated figures: %d of %d wrong"
              % (len(wrong), len(names)))
        print("  goal: rebuild >= 5x faster than jq: %s"
              % ("met" if jq >= 5 * rebuild else "MISSED"))

        print("\n4. report --check, best of 3")
        start, start_mem = measure([python, "-c", "pass"], out)
        print("  %-36s %7s %10s" % ("", "time", "peak RSS"))
        print("  %-36s %6.3fs %7.0f MB" % ("python -c pass", start, start_mem))
        figures = []
        for runs in (5000, options.check_runs):
            check_dir = os.path.join(work, "check-%d" % runs)
            os.makedirs(check_dir, exist_ok=True)
            make_ledger(check_dir, runs, rng)
            seconds, memory = measure([python, CLIENT, "report", "-d", check_dir, "--check",
                                       "--warn-below", "100", "--crit-below", "10"],
                                      out, codes=(0, 1, 2))
            figures.append((seconds, memory))
            print("  %-36s %6.3fs %7.0f MB" % ("--check, %d rows (%.0f MB)" % (
                2 * runs, os.path.getsize(os.path.join(check_dir, iperf_client.LEDGER_NAME))
                / 1e6), seconds, memory))
        print("  goal: under 0.2 s and 50 MB whatever the size: %s" % (
            "met" if all(s < 0.2 and m < 50 for s, m in figures) else "MISSED"))
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
