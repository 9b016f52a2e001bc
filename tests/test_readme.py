"""The README's quick start works exactly as written, and CI runs the README's test command."""

import os
import re
import subprocess
import sys

import pytest

import iperf_server
from conftest import ROOT, kill_pid, listening, require


def quick_start_commands():
    """The indented command lines of the README's "Quick start" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "iperf_server.py" in commands[0] and "iperf_client.py" in commands[0]
    assert "pytest" in commands[1] and ".[test]" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert quick_start_commands()[1] in ci


@pytest.mark.slow
def test_quick_start_main_job_measures_loopback_both_ways(tmp_path, iperf3):
    # The quick start uses the default port: it must be free (CI fails rather than skips).
    require(not listening(iperf_server.IPERF_PORT),
            "a free port %d" % iperf_server.IPERF_PORT, "REQUIRE_IPERF3")
    home = tmp_path / "home"
    home.mkdir()
    pidfile = str(home / "iperf.pid")
    try:
        done = subprocess.run(["bash", "-c", quick_start_commands()[0]], cwd=str(ROOT),
                              env=dict(os.environ, HOME=str(home)), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        ledger = (home / "iperf_results" / "results.csv").read_text().splitlines()
        assert len(ledger) == 3
        assert re.search(r",forward,127\.0\.0\.1,5201,2,2,ok,", ledger[1])
        assert re.search(r",reverse,127\.0\.0\.1,5201,2,2,ok,", ledger[2])
        assert re.search(r"^forward: 1 tests?, 1 ok", done.stdout, re.M), done.stdout
        assert re.search(r"^reverse: 1 tests?, 1 ok", done.stdout, re.M), done.stdout
    finally:
        for pid in iperf_server.our_daemons(pidfile):
            kill_pid(pid)


def test_one_version_for_both_scripts_and_the_package():
    import configparser
    import iperf_client
    import iperf_server
    assert iperf_client.__version__ == iperf_server.__version__
    config = configparser.ConfigParser()
    config.read(str(ROOT / "setup.cfg"))
    assert config["metadata"]["version"] == "attr: iperf_server.__version__"


@pytest.mark.parametrize("script,command", [("iperf_client.py", "iperf-client"),
                                            ("iperf_server.py", "iperf-server")])
def test_an_installed_command_names_itself_as_invoked(tmp_path, script, command):
    """pip installs the scripts as iperf-client and iperf-server: their lines say so."""
    link = tmp_path / command
    link.symlink_to(ROOT / script)
    done = subprocess.run([sys.executable, str(link), "--version"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert done.stdout.strip().startswith(command + " 2."), done.stdout
    done = subprocess.run([sys.executable, str(link), "--no-such-flag"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith(command + ": error: "), done.stderr
    assert done.stderr.count("\n") == 1
