#!/usr/bin/env python3
"""Benchmark of `iperf_client.py report` at a fleet's scale (run by hand, not by pytest).

Generates its own ledgers in a temporary folder and prints, each command a whole process with
its output to a file (best of --repeat), its time against a bare `csv.reader` pass over the same
file measured in the same run, and its peak memory (ru_maxrss of the process):

1. 5 links x a year of five-minute runs, both ways (1,051,200 rows): text, JSON and --html,
   each with no cache (--no-cache, as the first report) and with the report cache a report
   wrote a day of runs ago (a cron'd report's usual case: it reads the cache, checks it against
   the ledger, and reads the day's new lines). Goals: each within 2x the bare read and 100 MB.
2. The growth of memory with rows: the same over a quarter of the rows (about 250,000); goal:
   no more than about 40 bytes a row beyond a fixed base.
3. The README's mesh: 4 folders (hosts), each testing the 3 others, a year (12 links, 2.5
   million rows) as one HTML page, with no cache and with a day-old cache; goal: under 15 s
   and 200 MB.
4. `report --check` over the 1,000,000 rows (it reads the ledger's end only).
5. Where the time goes: the bare read, the chunk reader, the pass (with no cache, writing it,
   from it) and the figures at its end, timed in one process over section 1's ledger (CPU
   seconds).

The machine is often shared: compare the ratios of one run, and read the load it prints.

Usage: python3 tests/benchmarks/bench_scale.py [--days 365] [--repeat 2] [--keep DIR]
       [--skip-mesh]
"""

import argparse
import math
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
             "    for row in csv.reader(f):\n"
             "        pass\n")
INTERVAL = 300


def measure(argv, stdout_path, repeat, codes=(0,), before=None):
    """Best wall time (s) of `repeat` runs of argv with stdout to a file, the peak RSS (MB)
    of the process and its best CPU time (user + system, s: on a shared machine the fairer
    figure); an exit code not in `codes` stops the benchmark. `before()` runs before each."""
    best, peak, cpu = float("inf"), 0.0, float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        with open(stdout_path, "wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - started
            error = proc.stderr.read().decode()
            proc.stderr.close()
        code = os.waitstatus_to_exitcode(status) if hasattr(  # Python 3.9+
            os, "waitstatus_to_exitcode") else status >> 8
        if code not in codes:
            raise SystemExit("%s failed (%s): %s" % (" ".join(argv), code, error))
        best = min(best, elapsed)
        peak = max(peak, usage.ru_maxrss / 1024.0)
        cpu = min(cpu, usage.ru_utime + usage.ru_stime)
    CPU[tuple(argv)] = cpu
    return best, peak


CPU = {}  # argv -> the best CPU time measure() saw


def write_ledger(folder, client, servers, runs, rng, end=None):
    """A ledger of `runs` five-minute runs ending at `end`, each testing every server both
    ways: received ramps daily from 900 down to 613 Mbit/s and back, RTT under load rises with
    the load, 2% of the tests fail, 0.1% of the runs are skipped. Returns its row count."""
    end = time.time() if end is None else end
    start = end - runs * INTERVAL
    columns = iperf_client.LEDGER_COLUMNS
    count = 0
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, iperf_client.LEDGER_NAME), "w") as handle:
        handle.write(",".join(columns) + "\n")
        for index in range(runs):
            moment = start + index * INTERVAL
            run_ts = time.strftime(iperf_client.TIMESTAMP_FORMAT, time.localtime(moment))
            if rng.random() < 0.001:
                handle.write(skipped_row(moment, run_ts, client))
                count += 1
                continue
            load = 0.5 - 0.5 * math.cos(2 * math.pi * ((moment / 86400.0) % 1.0))
            lines = []
            for number, server in enumerate(servers):
                for offset, direction in ((1 + 130 * number, "forward"),
                                          (65 + 130 * number, "reverse")):
                    lines.append(test_row(moment + offset, run_ts, client, server, direction,
                                          load, rng))
            handle.write("".join(lines))
            count += len(lines)
    return count


def test_row(moment, run_ts, client, server, direction, load, rng):
    label = server.replace(".", "-")
    name = "%s_%s_%s.json" % (run_ts, label, "client" if direction == "forward" else "server")
    stamp = iperf_client.iso_time(moment)
    if rng.random() < 0.02:
        cells = [stamp, run_ts, "", direction, server, "5201", "30", "60", "error",
                 "unable to connect to server: Connection refused", "", "", "", "1", name,
                 client, label, "tcp", "", "", "", "", "", ""]
    else:
        received = (900e6 - 287e6 * load) * rng.uniform(0.97, 1.0)
        base = 12.0 + rng.uniform(0, 0.4)
        cells = [stamp, run_ts, "", direction, server, "5201", "30", "60", "ok", "",
                 repr(received * 1.002), repr(received), str(rng.randint(0, 3000)), "1", name,
                 client, label, "tcp", repr(base), repr(base + 40 * load * rng.uniform(0.8, 1.2)),
                 "", "", "", ""]
    return ",".join(cells) + "\n"


def skipped_row(moment, run_ts, client):
    cells = [iperf_client.iso_time(moment), run_ts, "", "forward", "", "", "", "", "skipped",
             "another run held the results folder", "", "", "", "", "", client, "", "", "", "",
             "", "", "", ""]
    return ",".join(cells) + "\n"


def load_text():
    return "load average %.2f %.2f %.2f" % os.getloadavg()


DAY_RUNS = 86400 // INTERVAL


class HeldBackDay:
    """The report cache as a cron'd report finds it: written by a report a day ago, the
    ledgers grown by a day of runs since. Holds the ledgers' last day of lines back, primes
    each folder's cache with a report, keeps those caches and gives the lines back;
    `restore()` puts the day-old caches back before each measured run."""

    def __init__(self, folders, prime_argv, out):
        self.folders, self.saved, self.lines, held = folders, {}, 0, {}
        for folder in folders:
            ledger = os.path.join(folder, iperf_client.LEDGER_NAME)
            held[ledger] = self.last_day(ledger)
            os.truncate(ledger, os.path.getsize(ledger) - len(held[ledger]))
            self.lines += held[ledger].count(b"\n")
        measure(prime_argv, out, 1)
        for folder in folders:  # kept on disk: this process stays small (see last_day)
            cache = os.path.join(folder, iperf_client.REPORT_CACHE_DIR)
            self.saved[cache] = cache + ".day-old"
            shutil.rmtree(self.saved[cache], ignore_errors=True)
            shutil.copytree(cache, self.saved[cache])
        for ledger, data in held.items():
            with open(ledger, "ab") as handle:
                handle.write(data)

    @staticmethod
    def last_day(ledger):
        """The ledger's lines of its last DAY_RUNS runs, read from its end only (this process
        stays small: a child's peak RSS starts from its parent's)."""
        with open(ledger, "rb") as handle:
            handle.seek(max(0, os.path.getsize(ledger) - 4 * 1024 * 1024))
            lines = handle.readlines()[1:]
        runs, index = set(), len(lines)
        while index > 0:
            run = lines[index - 1].split(b",", 2)[1]
            if run not in runs and len(runs) == DAY_RUNS:
                break
            runs.add(run)
            index -= 1
        return b"".join(lines[index:])

    def restore(self):
        for cache, copy in self.saved.items():
            shutil.rmtree(cache)
            shutil.copytree(copy, cache)


def section(title, rows_path, folder, out, repeat, formats):
    """Print the bare read and each format's figures over one folder, with no cache (the first
    report, or --no-cache) and with the cache a report wrote a day ago (the ledger a day of
    runs longer since: a cron'd report's usual case); returns {label: (seconds, MB)}."""
    python = sys.executable
    print("\n%s (%s)" % (title, load_text()))
    argvs = {"bare": [python, "-c", BARE_READ, rows_path]}
    for label, extra in formats:
        argvs[label + ", no cache"] = [python, CLIENT, "report", "-d", folder, "--no-cache"] \
            + extra
    figures = {label: measure(argv, out, repeat) for label, argv in argvs.items()}
    day = HeldBackDay([folder], [python, CLIENT, "report", "-d", folder], out)
    for label, extra in formats:
        argv = argvs[label + ", cache + a day"] = [python, CLIENT, "report", "-d", folder] + extra
        figures[label + ", cache + a day"] = measure(argv, out, repeat, before=day.restore)
    bare, bare_cpu = figures["bare"][0], CPU[tuple(argvs["bare"])]
    print("  (cache + a day: the report cache written a day of runs ago, %d lines since)"
          % day.lines)
    print("  %-38s %8s %9s %9s %9s %10s" % (
        "", "time", "vs bare", "CPU", "vs bare", "peak RSS"))
    for label, (seconds, memory) in figures.items():
        cpu = CPU[tuple(argvs[label])]
        print("  %-38s %7.2fs %8.2fx %8.2fs %8.2fx %7.0f MB" % (
            "bare csv.reader pass" if label == "bare" else label, seconds, seconds / bare,
            cpu, cpu / bare_cpu, memory))
    return figures


FORMATS = (("report (text)", []), ("report --format json", ["--format", "json"]),
           ("report --html", ["--html", "OUT.html"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=365.0, help="days of runs (a year)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each command (best)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    parser.add_argument("--skip-mesh", action="store_true", help="leave out section 3")
    options = parser.parse_args()
    rng = random.Random(20)
    work = options.keep or tempfile.mkdtemp(prefix="bench-scale-")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    formats = [(label, [out + ".html" if arg == "OUT.html" else arg for arg in extra])
               for label, extra in FORMATS]
    runs = int(options.days * 86400 / INTERVAL)
    servers = ["192.0.2.%d" % (10 + number) for number in range(5)]
    print("machine: %d CPUs, Python %s, %s" % (os.cpu_count(), sys.version.split()[0],
                                               load_text()))
    try:
        big = os.path.join(work, "big")
        rows = write_ledger(big, "bench", servers, runs, rng)
        ledger = os.path.join(big, iperf_client.LEDGER_NAME)
        large = section("1. 5 links x %g days, both ways: %d rows, %.0f MB" % (
            options.days, rows, os.path.getsize(ledger) / 1e6), ledger, big, out,
            options.repeat, formats)
        bare = large["bare"][0]
        print("  goals: within 2x the bare read and 100 MB:\n    %s" % ",\n    ".join(
            "%s %s" % (label.replace("report ", ""), "met" if seconds <= 2 * bare
                       and memory <= 100 else "MISSED")
            for label, (seconds, memory) in large.items() if label != "bare"))
        small = os.path.join(work, "small")
        quarter = write_ledger(small, "bench", servers, runs // 4, rng)
        few = section("2. the same over a quarter of the runs: %d rows" % quarter,
                      os.path.join(small, iperf_client.LEDGER_NAME), small, out,
                      options.repeat, formats)
        print("  memory growth per row, from %d to %d rows:" % (quarter, rows))
        for label in large:
            if label == "bare":
                continue
            growth = (large[label][1] - few[label][1]) * 1024 * 1024 / (rows - quarter)
            print("    %-36s %5.1f bytes/row (goal: about 40 or less): %s" % (
                label, growth, "met" if growth <= 44 else "MISSED"))
        check, check_mem = measure([sys.executable, CLIENT, "report", "-d", big, "--check",
                                    "--warn-below", "100", "--crit-below", "10"], out,
                                   options.repeat, codes=(0, 1, 2, 3))
        print("\n4. report --check over %d rows: %.3f s, %.0f MB (2.2: 0.2 s, 32 MB)" % (
            rows, check, check_mem))
        split(big)
        if not options.skip_mesh:
            mesh(work, runs, rng, out, options.repeat)
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


SPLIT = """import csv, gc, os, resource, shutil, sys, time
sys.path.insert(0, sys.argv[1])
import iperf_client as client
gc.disable()  # as the report runs
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
folder, ledger, figures = sys.argv[2], sys.argv[2] + "/" + client.LEDGER_NAME, []
start = cpu()
with open(ledger, newline="") as handle:
    for row in csv.reader(handle):
        pass
figures.append(("bare csv.reader pass", cpu() - start))
start = cpu()
with client.LedgerReader(ledger) as reader:
    for rows in reader.chunks():
        pass
figures.append(("LedgerReader (read, hash, split, map)", cpu() - start))
start = cpu()
tally = client.tally_folders([folder], client.Selection(
    None, None, None, ("forward", "reverse"), None, None, None))
figures.append(("tally_folders (the pass, no cache)", cpu() - start))
shutil.rmtree(os.path.join(folder, client.REPORT_CACHE_DIR), ignore_errors=True)
del tally
gc.collect()  # a tally holds cycles (a link and its directions)
start = cpu()
tally = client.tally_folders([folder], client.Selection(
    None, None, None, ("forward", "reverse"), None, None, None), cached=True)
figures.append(("tally_folders, writing the cache", cpu() - start))
del tally
gc.collect()
start = cpu()
tally = client.tally_folders([folder], client.Selection(
    None, None, None, ("forward", "reverse"), None, None, None), cached=True)
figures.append(("tally_folders, from the cache", cpu() - start))
start = cpu()
links = tally.sorted_links()
overview = client.link_overview(links, client.names_of(links), "both", time.time())
figures.append(("link_overview (statistics, hours)", cpu() - start))
start = cpu()
client.html_report(tally, links, overview, folder, None, None, None, time.time())
figures.append(("html_report (tables, charts)", cpu() - start))
for label, seconds in figures:
    print("  %-40s %6.2f s CPU %6.2fx" % (label, seconds, seconds / figures[0][1]))
"""


def split(folder):
    """Where the time goes: the report's parts timed in one process (CPU seconds)."""
    print("\n5. where the time goes, in one process over section 1's ledger (%s)" % load_text())
    sys.stdout.flush()
    subprocess.run([sys.executable, "-c", SPLIT, ROOT, folder], check=True,
                   stdin=subprocess.DEVNULL)


def mesh(work, runs, rng, out, repeat):
    """Section 3: the README's mesh of four hosts, each testing the three others."""
    hosts = ["a", "b", "c", "d"]
    folders, rows = [], 0
    for host in hosts:
        folder = os.path.join(work, "mesh", host)
        others = ["%s.example.net" % other for other in hosts if other != host]
        rows += write_ledger(folder, host, others, runs, rng)
        folders.append(folder)
    argv = [sys.executable, CLIENT, "report"]
    for folder in folders:
        argv += ["-d", folder]
    print("\n3. the README's mesh: 4 folders, 12 links, %d rows, one HTML page (%s)" % (
        rows, load_text()))
    bare = bare_cpu = 0.0
    for folder in folders:  # the four ledgers read one after the other, as the report does
        reading = [sys.executable, "-c", BARE_READ, os.path.join(folder,
                                                                 iperf_client.LEDGER_NAME)]
        bare += measure(reading, out, repeat)[0]
        bare_cpu += CPU[tuple(reading)]
    print("  bare csv.reader passes over the 4 ledgers: %.2f s (CPU %.2f s)" % (bare, bare_cpu))
    page = argv + ["--html", out + ".html"]
    cold = page[:2] + ["report", "--no-cache"] + page[3:]
    figures = [("no cache", cold, measure(cold, out, repeat))]
    day = HeldBackDay(folders, argv, out)
    figures.append(("cache + a day (%d lines)" % day.lines, page,
                    measure(page, out, repeat, before=day.restore)))
    for label, command, (seconds, memory) in figures:
        cpu = CPU[tuple(command)]
        print("  report -d a -d b -d c -d d --html, %s: %.2f s (%.2fx), CPU %.2f s (%.2fx), "
              "%.0f MB, page %.0f kB; goal: under 15 s and 200 MB: %s" % (
                  label, seconds, seconds / bare, cpu, cpu / bare_cpu, memory,
                  os.path.getsize(out + ".html") / 1e3,
                  "met" if seconds < 15 and memory < 200 else "MISSED"))


if __name__ == "__main__":
    main()
