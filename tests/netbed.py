"""A network test bed on one machine: two hosts in network namespaces joined by an emulated link.

    client host (netns cip-<pid>-<n>c)                 server host (netns cip-<pid>-<n>s)
    198.18.0.2/24 on tun cip-<pid>-<n>c  <-- wire -->  198.18.0.1/24 on tun cip-<pid>-<n>s

Addresses come from the benchmarking range 198.18.0.0/15 (RFC 2544) and exist only inside the two
namespaces, so no test traffic can leave them. Each direction is shaped on its way: first delay,
jitter and random loss by the wire, then the rate by the kernel's `tbf` qdisc where the packets
arrive (the receiving host's ingress, redirected through an `ifb` device). The wire is a small
relay process (`python3 netbed.py wire ...`, stdlib only) holding the two TUN devices: it reads
every packet one host sends, drops it with the loss probability, holds it for the delay (plus a
random jitter, never reordering) and writes it to the other host. Why not a veth pair with
`netem`: many kernels (this project's CI VM among them) are built without `sch_netem`, and no
other qdisc can delay packets; `tbf` is everywhere.

Cleanup: everything is named `cip-<pid of the pytest process>-<n>`. `NetBed.destroy()` kills every
process left in the namespaces, stops the wire (the TUN devices vanish with it) and deletes the
namespaces; it runs from fixture teardown, so also when a test fails. A run that was killed leaves
its namespaces behind: `cleanup_leftovers()` (called before each bed is built) deletes those whose
owner process is gone. The wire exits by itself when its standard input closes, that is when the
process that started it dies, however it dies.
"""

import fcntl
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time

PREFIX = "cip-"
SERVER_ADDR = "198.18.0.1"
CLIENT_ADDR = "198.18.0.2"
PREFIXLEN = 24
IFB = "cipin"  # per namespace, so one name serves every bed
BED_NICENESS = -10  # a bed's processes run ahead of the tests beside it (root only)
WIRE_PRIORITY = 10  # the wire's real-time (SCHED_RR) priority
NAME_RE = re.compile(r"^cip-(\d+)-(\d+)[cs]$")

_counter = itertools.count(1)


def available():
    """(True, "") when this machine can build a bed, else (False, the reason)."""
    if os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, "%s (iproute2) not found" % tool
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun missing"
    return True, ""


def _run(argv, check=True, timeout=20):
    """Run a command (an argv list, no shell); returns the CompletedProcess."""
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), proc.returncode,
                                                   proc.stderr.strip()))
    return proc


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate, timeout=10.0, interval=0.05):
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _kill_pids(pids):
    """SIGCONT (a stopped process can't die), SIGKILL, then wait a little for them to go."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                break
    deadline = time.monotonic() + 3
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def netns_pids(netns):
    """PIDs of the processes living in namespace `netns` (empty when it does not exist)."""
    proc = _run(["ip", "netns", "pids", netns], check=False)
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def list_netns():
    proc = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def delete_netns(netns):
    """Kill every process in `netns`, then delete it; never raises."""
    try:
        _kill_pids(netns_pids(netns))
        _run(["ip", "netns", "delete", netns], check=False)
    except (OSError, subprocess.SubprocessError):
        pass


def cleanup_leftovers():
    """Delete test-bed namespaces left by runs that were killed: those whose owner pid is gone.

    A bed that belongs to another live test session is left alone (two developers, or a
    developer and CI, may run the suite at the same time).
    """
    for netns in list_netns():
        match = NAME_RE.match(netns)
        if match and not pid_alive(int(match.group(1))):
            delete_netns(netns)


class Shape:
    """How one direction of the link behaves: rate in Mbit/s (None: unshaped), one-way delay and
    jitter in milliseconds, loss in percent."""

    def __init__(self, rate_mbit=None, delay_ms=0.0, jitter_ms=0.0, loss_pct=0.0):
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.jitter_ms = jitter_ms
        self.loss_pct = loss_pct

    def wire(self):
        return {"delay": self.delay_ms / 1000.0, "jitter": self.jitter_ms / 1000.0,
                "loss": self.loss_pct / 100.0}

    def __repr__(self):
        return "Shape(rate_mbit=%r, delay_ms=%r, jitter_ms=%r, loss_pct=%r)" % (
            self.rate_mbit, self.delay_ms, self.jitter_ms, self.loss_pct)


class NetBed:
    """Two hosts and the link between them. Build with `NetBed.create()`, end with `destroy()`.

    Attributes: `client_ns`, `server_ns` (namespace names, also the names of each host's device),
    `server_addr`, `client_addr`.
    """

    server_addr = SERVER_ADDR
    client_addr = CLIENT_ADDR

    def __init__(self, base):
        self.base = base
        self.client_ns = base + "c"
        self.server_ns = base + "s"
        self.wire_proc = None
        self.procs = []
        self.niceness = None
        self.shapes = {"forward": Shape(), "reverse": Shape()}

    @classmethod
    def create(cls, forward=None, reverse=None):
        """Build a bed; `forward` shapes client -> server, `reverse` server -> client."""
        cleanup_leftovers()
        bed = cls("%s%d-%d" % (PREFIX, os.getpid(), next(_counter)))
        try:
            bed._take_the_cpu_first()
            bed._build()
            bed.shape(forward or Shape(), reverse or Shape())
        except BaseException:
            bed.destroy()
            raise
        return bed

    def _take_the_cpu_first(self):
        """Run this process, and so everything the bed starts (the wire, the scripts, iperf3),
        ahead of the other tests (pytest-xdist runs them beside this one): the figures the tests
        ask for are timed (a round trip to a millisecond, a test's end within its hard limit),
        and the emulated link must not wait on a CPU the real one would not share. destroy()
        gives the priority back."""
        self.niceness = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(self.niceness, BED_NICENESS))

    def _build(self):
        for netns in (self.client_ns, self.server_ns):
            _run(["ip", "netns", "add", netns])
        # The wire creates both TUN devices in this (the root) namespace, then they move into the
        # hosts' namespaces before any address is set: nothing is ever up outside them.
        self.wire_proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "wire", self.client_ns, self.server_ns],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True, bufsize=1,
        )
        self._wire_reply()
        try:
            # The wire is the link: it forwards each packet when its time comes, ahead of every
            # ordinary process (a round trip is asked to the millisecond). It mostly sleeps in
            # select(); the kernel's real-time throttling bounds it anyway.
            os.sched_setscheduler(self.wire_proc.pid, os.SCHED_RR, os.sched_param(WIRE_PRIORITY))
        except (AttributeError, OSError):
            pass  # not permitted here: the niceness of _take_the_cpu_first() stays
        for netns, addr in ((self.client_ns, CLIENT_ADDR), (self.server_ns, SERVER_ADDR)):
            dev = netns
            _run(["ip", "link", "set", "dev", dev, "netns", netns])
            # No IPv6 (no router solicitations, no link-local chatter): IPv4 only.
            self.exec_in(netns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"],
                         check=False)
            _run(["ip", "-n", netns, "link", "set", "dev", "lo", "up"])
            _run(["ip", "-n", netns, "link", "set", "dev", dev, "txqueuelen", "2000"])
            _run(["ip", "-n", netns, "addr", "add", "%s/%d" % (addr, PREFIXLEN), "dev", dev])
            _run(["ip", "-n", netns, "link", "set", "dev", dev, "up"])
            # Incoming traffic goes through an ifb device, where shape() puts the rate limit.
            _run(["ip", "-n", netns, "link", "add", "name", IFB, "type", "ifb"])
            _run(["ip", "-n", netns, "link", "set", "dev", IFB, "up"])
            _run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"])
            _run(["tc", "-n", netns, "filter", "add", "dev", dev, "parent", "ffff:", "protocol",
                  "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress",
                  "redirect", "dev", IFB])

    def _wire_reply(self):
        line = self.wire_proc.stdout.readline()
        if not line.startswith("ok"):
            raise RuntimeError("wire failed: %r (exit %s)" % (line, self.wire_proc.poll()))

    def shape(self, forward=None, reverse=None):
        """Change the link's behaviour now; a direction given as None keeps its shape."""
        for direction, netns, shape in (("forward", self.server_ns, forward),
                                        ("reverse", self.client_ns, reverse)):
            if shape is None:
                continue
            self.shapes[direction] = shape
            self.wire_proc.stdin.write(json.dumps({direction: shape.wire()}) + "\n")
            self.wire_proc.stdin.flush()
            self._wire_reply()
            # The rate is enforced where the packets arrive (the receiving host's ingress,
            # redirected through an ifb device whose egress has the tbf), not on the sender: a
            # qdisc on the sender's own device drops packets in the sender's stack, which TCP
            # counts as thousands of bogus retransmits; a real bottleneck is further away.
            if shape.rate_mbit:
                rate = shape.rate_mbit * 1e6 / 8  # bytes per second
                # burst: a few ms of traffic, so the rate holds despite timer slack; limit: about
                # a round trip's worth of queue (at least 30 ms), so TCP can keep the link busy.
                burst = int(max(15000, rate * 0.004))
                rtt = self.shapes["forward"].delay_ms + self.shapes["reverse"].delay_ms
                limit = int(max(3 * burst, rate * (0.03 + rtt / 1000.0)))
                _run(["tc", "-n", netns, "qdisc", "replace", "dev", IFB, "root", "tbf",
                      "rate", "%dbit" % int(shape.rate_mbit * 1e6), "burst", str(burst),
                      "limit", str(limit)])
            else:
                _run(["tc", "-n", netns, "qdisc", "del", "dev", IFB, "root"], check=False)

    def link(self, up):
        """Take both ends of the link down (a pulled cable) or bring them back up."""
        for netns in (self.client_ns, self.server_ns):
            _run(["ip", "-n", netns, "link", "set", "dev", netns, "up" if up else "down"])

    def argv_in(self, netns, argv):
        """The argv that runs `argv` inside namespace `netns`."""
        return ["ip", "netns", "exec", netns] + [str(a) for a in argv]

    def exec_in(self, netns, argv, check=True, timeout=120, env=None):
        """Run `argv` in `netns` to completion (stdin closed, output captured as text)."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.run(
            self.argv_in(netns, argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout, env=full_env,
        )
        if check and proc.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (argv, proc.returncode, proc.stderr))
        return proc

    def popen_in(self, netns, argv, **kwargs):
        """Start `argv` in `netns` in the background (stdin closed); destroy() kills it."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("universal_newlines", True)
        proc = subprocess.Popen(self.argv_in(netns, argv), **kwargs)
        self.procs.append(proc)
        return proc

    def iperf3_server(self, port=5201, one_off=True, extra=()):
        """Start a plain `iperf3 -s` on the server host's address and wait until it listens."""
        argv = ["iperf3", "-s", "--forceflush", "-B", SERVER_ADDR, "-p", port]
        proc = self.popen_in(self.server_ns, argv + (["-1"] if one_off else []) + list(extra))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or "listening" in line:
                break
        if proc.poll() is not None:
            raise RuntimeError("iperf3 -s exited: %s" % proc.stderr.read())
        return proc

    def raw_iperf3_client(self, args, port=5201, timeout=60):
        """One plain iperf3 test from the client host to the server already running on the server
        host; `args` are the options besides -c, -p and -J. Returns the parsed JSON."""
        proc = self.exec_in(self.client_ns,
                            ["iperf3", "-c", SERVER_ADDR, "-p", port, "-J"] + list(args),
                            check=False, timeout=timeout)
        return json.loads(proc.stdout)

    def raw_iperf3(self, args, port=5201, timeout=60):
        """Like raw_iperf3_client, against a one-off plain `iperf3 -s -1` started for it."""
        server = self.iperf3_server(port)
        try:
            result = self.raw_iperf3_client(args, port, timeout)
            server.wait(timeout=10)
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate()
        return result

    def kill_all_in(self, netns):
        """Kill every process in `netns` (daemons included) and wait for them to go."""
        _kill_pids(netns_pids(netns))

    def destroy(self):
        """Tear everything down; never raises, safe to call twice."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.kill()
                except OSError:
                    pass
        for netns in (self.client_ns, self.server_ns):
            self.kill_all_in(netns)
        for proc in self.procs:
            try:
                proc.communicate(timeout=5)
            except (subprocess.SubprocessError, OSError, ValueError):
                pass
        if self.wire_proc is not None and self.wire_proc.poll() is None:
            self.wire_proc.kill()
            self.wire_proc.wait()
            for stream in (self.wire_proc.stdin, self.wire_proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        for netns in (self.client_ns, self.server_ns):
            delete_netns(netns)
        if self.niceness is not None:
            os.setpriority(os.PRIO_PROCESS, 0, self.niceness)
            self.niceness = None


# --- the wire (runs as its own process: `python3 netbed.py wire CLIENT_DEV SERVER_DEV`) ---

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
JITTER_PERIOD = 0.005  # seconds between changes of the jitter offset
MAX_QUEUE = 20000  # packets held per direction; beyond that the wire drops (a full buffer)


def _open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def wire_main(client_dev, server_dev):
    """Relay packets between two TUN devices, applying each direction's delay, jitter and loss.

    Commands arrive on stdin, one JSON object a line: {"forward"|"reverse": {"delay": s,
    "jitter": s, "loss": fraction}}; each is answered "ok" on stdout. EOF on stdin ends the wire.
    """
    try:
        os.nice(-10)  # the link should not slow down because other processes keep the CPUs busy
    except OSError:
        pass
    fds = {"forward": _open_tun(client_dev), "reverse": _open_tun(server_dev)}
    out_fd = {"forward": fds["reverse"], "reverse": fds["forward"]}
    params = {d: {"delay": 0.0, "jitter": 0.0, "loss": 0.0} for d in fds}
    queues = {d: [] for d in fds}  # lists of (release time, packet), release times ascending
    heads = {d: 0 for d in fds}
    last_release = {d: 0.0 for d in fds}
    jitter = {d: 0.0 for d in fds}
    jitter_until = {d: 0.0 for d in fds}
    by_fd = {fd: d for d, fd in fds.items()}
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    pending = b""
    print("ok", flush=True)
    while True:
        now = time.monotonic()
        timeout = 1.0
        for d in fds:
            if heads[d] < len(queues[d]):
                timeout = min(timeout, max(0.0, queues[d][heads[d]][0] - now))
        readable, _, _ = select.select([stdin] + list(fds.values()), [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            if fd == stdin:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return 0
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    for d, value in json.loads(line.decode()).items():
                        params[d].update(value)
                    print("ok", flush=True)
                continue
            d = by_fd[fd]
            p = params[d]
            queue = queues[d]
            for _ in range(256):
                try:
                    packet = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if p["loss"] and random.random() < p["loss"]:
                    continue
                if not p["delay"] and not p["jitter"] and heads[d] == len(queue):
                    _write(out_fd[d], packet)
                    continue
                if len(queue) - heads[d] >= MAX_QUEUE:
                    continue
                if p["jitter"] and now >= jitter_until[d]:
                    # The delay wanders: a new offset every few ms, shared by the packets in
                    # between. A new draw per packet, with the order kept, would pile every
                    # packet onto the largest recent delay (mean delay + jitter, no variation).
                    jitter[d] = random.uniform(-p["jitter"], p["jitter"])
                    jitter_until[d] = now + JITTER_PERIOD
                release = now + p["delay"] + (jitter[d] if p["jitter"] else 0.0)
                # Never reorder: a packet leaves no earlier than the one before it.
                release = max(release, last_release[d])
                last_release[d] = release
                queue.append((release, packet))
        for d in fds:
            queue = queues[d]
            head = heads[d]
            while head < len(queue) and queue[head][0] <= now:
                _write(out_fd[d], queue[head][1])
                head += 1
            if head > 4096 and head * 2 > len(queue):
                del queue[:head]
                head = 0
            heads[d] = head


def _write(fd, packet):
    try:
        os.write(fd, packet)
    except OSError:
        pass  # the device is down (EIO) or its queue is full: the packet is lost, as on a wire


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "wire":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        sys.exit(wire_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: netbed.py wire CLIENT_DEV SERVER_DEV")
