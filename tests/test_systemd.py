"""The systemd units of docs/systemd/: systemd-analyze verifies them, they hold the settings
docs/systemd.md explains, and their ExecStart lines work when run the way systemd runs them.

systemd itself cannot run here (it is not PID 1), so what it would do with the units is read from
them (KillMode=, Type=, the timers) rather than watched."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import iperf_client
from conftest import CLIENT_SCRIPT, ROOT, SERVER_SCRIPT, listening, read_ledger, require

UNITS = ROOT / "docs" / "systemd"
SERVER = "continuous-iperf-server"
CLIENT = "continuous-iperf-client"
# Where docs/systemd.md installs the scripts, and the scripts in this checkout.
INSTALLED = {"/usr/local/bin/iperf_server.py": SERVER_SCRIPT,
             "/usr/local/bin/iperf_client.py": CLIENT_SCRIPT}
# The PATH systemd gives a system service (systemd.exec(5), "Environment Variables").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"


def parse_unit(path):
    """A unit file as {section: {key: [values in order]}}: systemd's syntax as far as our units
    use it (comments, sections, Key=value, no line continuations)."""
    sections = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line and not line.endswith("\\"), \
            "%s:%d: %s" % (path.name, number, line)
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name):
    return parse_unit(UNITS / name)


def setting(parsed, section, key):
    """The value systemd uses (the last one given), or None."""
    values = parsed.get(section, {}).get(key)
    return values[-1] if values else None


def exec_start(parsed):
    """The service's one ExecStart= line, split into words."""
    lines = parsed["Service"]["ExecStart"]
    assert len(lines) == 1, lines
    # systemd expands $VAR and %-specifiers; shlex does not. Our lines need neither.
    assert not re.search(r"[$%]", lines[0]), lines[0]
    return shlex.split(lines[0])


def directory(parsed, key, base):
    """The absolute path of the service's StateDirectory= or LogsDirectory= (one each)."""
    name = setting(parsed, "Service", key)
    assert name and " " not in name, (key, name)
    return base + "/" + name


def flag(argv, name):
    """The value given to `name` in argv (the last one, as argparse takes it)."""
    values = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == name]
    assert values, "%s not in %s" % (name, argv)
    return values[-1]


def under(path, folder):
    return path == folder or path.startswith(folder + "/")


@pytest.fixture(scope="module")
def systemd_analyze():
    """Path of systemd-analyze (skips, or fails with REQUIRE_SYSTEMD=1, where there is none)."""
    path = shutil.which("systemd-analyze")
    require(path is not None, "systemd-analyze", "REQUIRE_SYSTEMD")
    return path


def analyze(tool, *args):
    return subprocess.run([tool, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)


# --- What the units say ---

def test_docs_hold_one_timer_and_service_pair_per_script():
    assert sorted(path.name for path in UNITS.iterdir()) == sorted(
        name + suffix for name in (SERVER, CLIENT) for suffix in (".service", ".timer"))
    page = (ROOT / "docs" / "systemd.md").read_text()
    for path in UNITS.iterdir():
        assert path.name in page, path.name


@pytest.mark.parametrize("name", [SERVER, CLIENT])
def test_each_timer_starts_its_service_and_only_the_timer_is_enabled(name):
    timer = unit(name + ".timer")
    started = setting(timer, "Timer", "Unit") or name + ".service"
    assert (UNITS / started).is_file(), started
    assert setting(timer, "Install", "WantedBy") == "timers.target"
    # The service has no [Install]: `systemctl enable` of it would do nothing; the timer runs it.
    assert "Install" not in unit(started)


@pytest.mark.parametrize("name", [SERVER, CLIENT])
def test_services_are_oneshots_that_the_timer_can_start_again(name):
    service = unit(name + ".service")
    assert setting(service, "Service", "Type") == "oneshot"
    # systemd.timer(5): a service that stays active (RemainAfterExit=yes) would run only once.
    assert setting(service, "Service", "RemainAfterExit") in (None, "no")
    # A oneshot has no start timeout by default, and a hung run would keep the timer from firing.
    assert setting(service, "Service", "TimeoutStartSec") not in (None, "infinity", "0")
    assert setting(service, "Service", "User") == "continuous-iperf"
    assert setting(service, "Service", "DynamicUser") in (None, "no")
    assert setting(service, "Service", "NoNewPrivileges") == "yes"
    assert setting(service, "Service", "ProtectSystem") == "strict"
    assert setting(service, "Service", "ProtectHome") == "yes"
    assert exec_start(service)[0] in INSTALLED


def test_server_service_leaves_the_daemon_running_with_what_it_needs():
    service = unit(SERVER + ".service")
    # The default (control-group) kills what is left in the unit's control group when the
    # oneshot ends: the daemon the run started with -D.
    assert setting(service, "Service", "KillMode") == "process"
    # A RuntimeDirectory= or a PrivateTmp= is deleted when each run ends, under the daemon's feet.
    assert setting(service, "Service", "RuntimeDirectory") is None
    assert setting(service, "Service", "PrivateTmp") in (None, "no")
    state = directory(service, "StateDirectory", "/var/lib")
    logs = directory(service, "LogsDirectory", "/var/log")
    # ProtectSystem=strict: the pidfile (its .lock, .state) and the log must lie in the only
    # writable folders, and so must iperf3's temporary files ($TMPDIR, else a read-only /tmp).
    argv = exec_start(service)
    assert under(flag(argv, "--pidfile"), state)
    assert under(flag(argv, "--log-file"), logs)
    environment = dict(item.split("=", 1) for line in service["Service"].get("Environment", [])
                       for item in shlex.split(line))
    assert under(environment.get("TMPDIR", "/tmp"), state)


def test_client_service_lets_the_script_record_the_test_it_stops():
    service = unit(CLIENT + ".service")
    # SIGTERM to the script alone (it stops its iperf3 and records the partial test), then
    # SIGKILL to anything left; the daemon-keeping "process" has no place here.
    assert setting(service, "Service", "KillMode") == "mixed"
    argv = exec_start(service)
    assert flag(argv, "--results-dir") == directory(service, "StateDirectory", "/var/lib")
    # Refused by the script until the admin sets the server: nothing is measured by mistake.
    assert flag(argv, "--server") == iperf_client.PLACEHOLDER_SERVER


def test_the_pages_install_line_sets_the_server_in_execstart_only():
    """docs/systemd.md copies the client's service through sed: it must replace the placeholder
    on the ExecStart= line (sed: the first match of each line)."""
    page = (ROOT / "docs" / "systemd.md").read_text()
    old, new = re.search(r"^    sed 's/([^/]+)/([^/]+)/' docs/systemd/%s\.service " % CLIENT, page,
                         re.M).groups()
    text = (UNITS / (CLIENT + ".service")).read_text()
    changed = [line for line in text.splitlines() if old in line]
    assert len(changed) == 1 and changed[0].startswith("ExecStart="), changed
    argv = shlex.split(changed[0].replace(old, new, 1).split("=", 1)[1])
    assert flag(argv, "--server") == "192.0.2.7"


def normalized_calendar(tool, spec):
    done = analyze(tool, "calendar", spec)
    assert done.returncode == 0, done.stdout
    return re.search(r"Normalized form: (.*)", done.stdout).group(1).strip()


def test_timers_run_the_server_every_minute_and_the_client_every_five(systemd_analyze):
    server = unit(SERVER + ".timer")
    client = unit(CLIENT + ".timer")
    assert normalized_calendar(systemd_analyze, setting(server, "Timer", "OnCalendar")) \
        == "*-*-* *:*:00"
    assert normalized_calendar(systemd_analyze, setting(client, "Timer", "OnCalendar")) \
        == "*-*-* *:00/5:00"
    # Splay for a fleet, the same offset at every run of a host; no catching up after downtime.
    assert setting(client, "Timer", "RandomizedDelaySec") not in (None, "0")
    assert setting(client, "Timer", "FixedRandomDelay") == "yes"
    for timer in (server, client):
        assert setting(timer, "Timer", "AccuracySec") == "1s"
        assert setting(timer, "Timer", "Persistent") in (None, "false")


# --- systemd-analyze verify ---

def verify_options(tool):
    """Options that make verify judge only the files given, offline: not the host's own units
    (--recursive-errors=no, systemd 250+), not man pages."""
    options = ["--man=no"]
    if "--recursive-errors" in analyze(tool, "--help").stdout:
        options.append("--recursive-errors=no")
    return options


def copy_for_verify(name, folder):
    """The pair `name` copied into `folder`, ExecStart= running this checkout's script with this
    Python (verify checks that the executable exists); returns the two paths."""
    paths = []
    for suffix in (".timer", ".service"):
        text = (UNITS / (name + suffix)).read_text()
        for installed, script in INSTALLED.items():
            assert not re.search(r"\s", sys.executable + str(script))
            text = text.replace("ExecStart=" + installed + " ",
                                "ExecStart=%s %s " % (sys.executable, script))
        path = folder / (name + suffix)
        path.write_text(text)
        paths.append(path)
    assert "/usr/local/bin" not in paths[1].read_text().split("ExecStart=", 1)[1].split("\n")[0]
    return paths


@pytest.mark.parametrize("name", [SERVER, CLIENT])
def test_systemd_analyze_verify_accepts_each_pair(systemd_analyze, tmp_path, name):
    paths = copy_for_verify(name, tmp_path)
    done = analyze(systemd_analyze, "verify", *verify_options(systemd_analyze),
                   *[str(path) for path in paths])
    about_ours = [line for line in done.stdout.splitlines()
                  if name in line or str(tmp_path) in line]
    assert done.returncode == 0 and not about_ours, done.stdout


def test_systemd_analyze_verify_would_say_what_is_wrong(systemd_analyze, tmp_path):
    """The check above can fail: verify, as run there, reports a bad key and a missing program."""
    timer, service = copy_for_verify(SERVER, tmp_path)
    service.write_text(service.read_text().replace("ExecStart=%s " % sys.executable,
                                                   "ExecStart=/nonexistent/python3 ")
                       + "Bogus=1\n")
    done = analyze(systemd_analyze, "verify", *verify_options(systemd_analyze),
                   str(timer), str(service))
    assert done.returncode != 0, done.stdout
    assert "Bogus" in done.stdout and "/nonexistent/python3" in done.stdout, done.stdout


# --- The ExecStart lines, run as systemd runs a service ---

def command(parsed, folders):
    """The service's ExecStart as an argv for here: the installed script replaced by this
    checkout's (run by this Python), and each systemd folder (a key of `folders`) by ours."""
    argv = exec_start(parsed)
    argv[:1] = [sys.executable, str(INSTALLED[argv[0]])]
    rewritten = []
    for word in argv:
        for folder, ours in folders.items():
            if under(word, folder):
                word = str(ours) + word[len(folder):]
        rewritten.append(word)
    return rewritten


def run_as_systemd(argv, parsed, home, iperf3, folders=None):
    """Run `argv` as systemd would run the service: its own session, stdin /dev/null, output
    captured (the journal), working directory /, systemd's PATH, a HOME that does not exist (a
    system user's), and the unit's Environment= (with its folders rewritten)."""
    env = {"PATH": SYSTEMD_PATH, "HOME": str(home), "LANG": "C.UTF-8"}
    if os.path.dirname(iperf3) not in SYSTEMD_PATH.split(":"):
        env["PATH"] += ":" + os.path.dirname(iperf3)  # an iperf3 installed elsewhere, for the test
    for line in parsed["Service"].get("Environment", []):
        for item in shlex.split(line):
            key, value = item.split("=", 1)
            for folder, ours in (folders or {}).items():
                if under(value, folder):
                    value = str(ours) + value[len(folder):]
            env[key] = value
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, cwd="/",
                          start_new_session=True, timeout=90)


@pytest.mark.slow
def test_the_units_commands_keep_a_server_and_measure_it_both_ways(host, iperf3, tmp_path):
    server = unit(SERVER + ".service")
    state = directory(server, "StateDirectory", "/var/lib")
    logs = directory(server, "LogsDirectory", "/var/log")
    # Both folders map to the host fixture's, which then finds and kills the daemon.
    folders = {state: tmp_path, logs: tmp_path}
    argv = command(server, folders)
    argv[argv.index("--port") + 1] = str(host.port)
    assert flag(argv, "--pidfile") == host.pidfile and flag(argv, "--log-file") == host.log_file
    home = tmp_path / "home-that-does-not-exist"

    daemons = []
    for _ in range(2):  # a first minute starts the daemon, the next one finds it healthy
        done = run_as_systemd(argv, server, home, iperf3, folders)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done.stderr
        daemons.append(host.daemons())
    assert len(daemons[0]) == 1 and daemons[1] == daemons[0] and listening(host.port)

    client = unit(CLIENT + ".service")
    results = tmp_path / "results"
    argv = command(client, {directory(client, "StateDirectory", "/var/lib"): results})
    argv[argv.index("--server") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(host.port)
    argv += ["--duration", "1", "--streams", "1"]  # short: the flags an admin's drop-in adds
    done = run_as_systemd(argv, client, home, iperf3)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done.stderr
    rows = read_ledger(results)
    assert [(row["direction"], row["status"]) for row in rows] == [("forward", "ok"),
                                                                   ("reverse", "ok")]
    assert not home.exists(), "a script wrote below HOME: a flag of the unit is missing"
