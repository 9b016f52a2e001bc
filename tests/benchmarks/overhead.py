#!/usr/bin/env python3
"""What the scripts cost on top of iperf3 on its own, measured on the network test bed.

Builds the two-host bed of tests/netbed.py (network namespaces, a link shaped per direction),
starts the server with iperf_server.py on the server host, then alternates, `--runs` times:
one iperf_client.py run (forward and reverse test) and the same two tests as plain
`iperf3 -c ... -J` commands, all against the same daemon over the same link. It reports:

- the wall time of a client run minus that of the two plain commands (goal: under 0.3 s), and
- the ratio of the received throughput the client recorded to what plain iperf3 measured, per
  direction (goal: 1.00 within the noise).

Needs root, iproute2 and iperf3. Usage (from the repository's root):

    sudo python3 tests/benchmarks/overhead.py [--runs 5] [--duration 2] [--streams 2]
"""

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))

import netbed  # noqa: E402 (tests/ is put on the path above)

SERVER_SCRIPT = os.path.join(ROOT, "iperf_server.py")
CLIENT_SCRIPT = os.path.join(ROOT, "iperf_client.py")
PORT = 5201


def timed(bed, netns, argv):
    """Run argv in netns; returns (CompletedProcess, wall seconds)."""
    start = time.monotonic()
    done = bed.exec_in(netns, argv, check=False, timeout=300)
    return done, time.monotonic() - start


def received_bps(stdout):
    document = json.loads(stdout)
    if "error" in document:
        raise RuntimeError("plain iperf3 failed: %s" % document["error"])
    return document["end"]["sum_received"]["bits_per_second"]


def measure(args, folder):
    forward = netbed.Shape(args.forward_mbit, delay_ms=args.delay_ms / 2.0)
    reverse = netbed.Shape(args.reverse_mbit, delay_ms=args.delay_ms / 2.0)
    bed = netbed.NetBed.create(forward, reverse)
    try:
        server = bed.exec_in(bed.server_ns, [
            sys.executable, SERVER_SCRIPT, "--pidfile", os.path.join(folder, "iperf.pid"),
            "--log-file", os.path.join(folder, "iperf_monitor.log"), "-p", PORT,
            "-B", netbed.SERVER_ADDR], check=False)
        if server.returncode != 0:
            raise RuntimeError("iperf_server.py failed: %s" % server.stderr.strip())
        results = os.path.join(folder, "results")
        client = [sys.executable, CLIENT_SCRIPT, "-c", netbed.SERVER_ADDR, "-p", PORT,
                  "-t", args.duration, "-P", args.streams, "-d", results]
        plain = ["iperf3", "-c", netbed.SERVER_ADDR, "-p", PORT, "-J",
                 "-t", args.duration, "-P", args.streams]
        extra, plain_bps = [], {"forward": [], "reverse": []}
        for _ in range(args.runs):
            done, script_wall = timed(bed, bed.client_ns, client)
            if done.returncode != 0:
                raise RuntimeError("iperf_client.py failed: %s" % done.stderr.strip())
            plain_wall = 0.0
            for direction, flags in (("forward", []), ("reverse", ["-R"])):
                done, wall = timed(bed, bed.client_ns, plain + flags)
                plain_wall += wall
                plain_bps[direction].append(received_bps(done.stdout))
            extra.append(script_wall - plain_wall)
        with open(os.path.join(results, "results.csv"), newline="") as handle:
            rows = list(csv.DictReader(handle))
        script_bps = {d: [float(r["received_bps"]) for r in rows if r["direction"] == d]
                      for d in plain_bps}
        return extra, script_bps, plain_bps
    finally:
        bed.destroy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="client runs (default: %(default)s)")
    parser.add_argument("--duration", type=int, default=2,
                        help="seconds per test (default: %(default)s)")
    parser.add_argument("--streams", type=int, default=2,
                        help="streams per test (default: %(default)s)")
    parser.add_argument("--forward-mbit", type=float, default=50,
                        help="client -> server rate (default: %(default)s)")
    parser.add_argument("--reverse-mbit", type=float, default=20,
                        help="server -> client rate (default: %(default)s)")
    parser.add_argument("--delay-ms", type=float, default=0,
                        help="round-trip delay added by the link (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    ok, why = netbed.available()
    if not ok:
        print("overhead: cannot build the test bed: %s" % why, file=sys.stderr)
        return 1
    folder = tempfile.mkdtemp(prefix="cip-bench-")
    try:
        extra, script_bps, plain_bps = measure(args, folder)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print("overhead: %s" % exc, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    figures = {
        "runs": args.runs, "duration": args.duration, "streams": args.streams,
        "extra_seconds_per_run": {"median": statistics.median(extra), "min": min(extra),
                                  "max": max(extra)},
    }
    for direction in ("forward", "reverse"):
        ours, theirs = statistics.median(script_bps[direction]), \
            statistics.median(plain_bps[direction])
        figures[direction] = {"script_mbit": ours / 1e6, "plain_mbit": theirs / 1e6,
                              "ratio": ours / theirs}
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print("link: %g Mbit/s forward, %g Mbit/s reverse, %g ms added round trip; %d runs of "
          "2 x %d s, %d streams" % (args.forward_mbit, args.reverse_mbit, args.delay_ms,
                                    args.runs, args.duration, args.streams))
    spread = figures["extra_seconds_per_run"]
    print("extra wall time per client run: median %.3f s (min %.3f, max %.3f)"
          % (spread["median"], spread["min"], spread["max"]))
    for direction in ("forward", "reverse"):
        item = figures[direction]
        print("%-8s script %.2f Mbit/s, plain iperf3 %.2f Mbit/s, ratio %.4f"
              % (direction, item["script_mbit"], item["plain_mbit"], item["ratio"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
