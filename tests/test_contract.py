"""The contract between the two scripts and their admin: the code both define is one block,
byte for byte the same; every flag's default is a setting in the admin's block; both scripts'
log files and fatal lines look alike; the client's validators only validate."""

import argparse
import errno
import ast
import os
import re
import subprocess
import sys

import pytest

import iperf_client
import iperf_server
from conftest import CLIENT_SCRIPT, FAKE_RESULT, SERVER_SCRIPT, free_port, run_script

SCRIPTS = (SERVER_SCRIPT, CLIENT_SCRIPT)
BEGIN = "# --- Shared with iperf_server.py / iperf_client.py ---"
END = "# --- End of the block shared with iperf_server.py / iperf_client.py ---"
# Every script has these two (style.md: build_parser(), then main(argv=None)); they are its own.
ENTRY_POINTS = {"build_parser", "main"}
ADMIN_BANNER = "# --- Settings an admin may edit"


def shared_span(path):
    """(first, last) line numbers (1-based) of the shared block's markers in a script."""
    lines = path.read_text().splitlines()
    begins = [n for n, line in enumerate(lines, 1) if line.startswith(BEGIN)]
    ends = [n for n, line in enumerate(lines, 1) if line.startswith(END)]
    assert len(begins) == 1 and len(ends) == 1, (path, begins, ends)
    assert begins[0] < ends[0]
    return begins[0], ends[0]


def shared_text(path):
    first, last = shared_span(path)
    return "\n".join(path.read_text().splitlines()[first - 1:last])


def top_level_definitions(path):
    """{name: (first line, last line)} of the functions and classes a script defines."""
    tree = ast.parse(path.read_text())
    return {node.name: (node.lineno, node.end_lineno) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_the_shared_blocks_are_byte_for_byte_the_same():
    server, client = (shared_text(path) for path in SCRIPTS)
    assert server == client


def test_every_definition_both_scripts_hold_is_in_the_shared_block():
    """A function or class defined in both is the same code (in the block), or it has another
    name in one of them: a new copy outside the block fails here."""
    server, client = (top_level_definitions(path) for path in SCRIPTS)
    for path, definitions in zip(SCRIPTS, (server, client)):
        first, last = shared_span(path)
        for name in (set(server) & set(client)) - ENTRY_POINTS:
            start, end = definitions[name]
            assert first < start and end < last, "%s: %s is outside the shared block" % (
                path.name, name)


def test_the_shared_block_stands_above_every_other_definition():
    """High in the file, after the settings and constants: everything below may use it."""
    for path in SCRIPTS:
        first, last = shared_span(path)
        definitions = top_level_definitions(path)
        above = [name for name, (start, _) in definitions.items() if start < first]
        assert above == [], (path, above)


def test_each_script_names_itself_for_the_shared_program_name():
    assert iperf_server.SCRIPT_NAME == "iperf_server.py"
    assert iperf_client.SCRIPT_NAME == "iperf_client.py"


# --- Every flag's default is a setting in the admin's block ---

def admin_settings(module):
    """{name: value} of the UPPER_CASE settings between the admin banner and the next banner."""
    path = module.__file__
    lines = open(path).read().splitlines()
    start = next(n for n, line in enumerate(lines, 1) if line.startswith(ADMIN_BANNER))
    end = next(n for n, line in enumerate(lines, 1) if n > start and line.startswith("# --- "))
    names = [target.id for node in ast.parse(open(path).read()).body
             if isinstance(node, ast.Assign) and start < node.lineno < end
             for target in node.targets if isinstance(target, ast.Name)]
    return {name: getattr(module, name) for name in names}


def parsers():
    yield iperf_server, iperf_server.build_parser
    yield iperf_client, iperf_client.build_parser
    yield iperf_client, iperf_client.build_report_parser


def flag_defaults(build):
    for action in build()._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        yield "/".join(action.option_strings) or action.dest, action


def trivial(action):
    """A default that is no setting: None (the flag was not given; the code falls back to a
    setting or to nothing), False of a switch that turns something on, 0 of a counter (-v,
    -q)."""
    if action.default is None:
        return True
    if isinstance(action, argparse._StoreTrueAction):
        return action.default is False
    return isinstance(action, argparse._CountAction) and action.default == 0


@pytest.mark.parametrize("module, build", list(parsers()),
                         ids=["server", "client", "client report"])
def test_every_flag_default_is_a_setting_in_the_admins_block(monkeypatch, module, build):
    """The rule: a flag's default is None, False for a switch that turns something on, 0 for a
    counter, or else the value of an UPPER_CASE setting in the admin's block ("Settings an
    admin may edit") -- read from it: changing the setting changes the default."""
    settings = admin_settings(module)
    for flag, action in flag_defaults(build):
        if trivial(action):
            continue
        names = [name for name, value in settings.items()
                 if type(value) is type(action.default) and value == action.default]
        assert names, "%s: default %r is no admin setting" % (flag, action.default)
        changed = False
        for name in names:
            value = settings[name]
            other = (not value if isinstance(value, bool) else value + 1
                     if isinstance(value, (int, float)) else value + "x")
            monkeypatch.setattr(module, name, other)
            changed = changed or dict(flag_defaults(build))[flag].default == other
            monkeypatch.setattr(module, name, value)
        assert changed, "%s: default %r is not read from %s" % (flag, action.default, names)


# --- The same log lines and fatal lines in both scripts ---

LOG_LINE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} iperf_(client|server) +"
                         r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")


def test_both_log_files_have_the_year_and_the_zone(tmp_path, fake_iperf3):
    done = run_script(CLIENT_SCRIPT, ["-c", "127.0.0.1", "-t", "1", "-P", "2", "-d",
                                      tmp_path / "results", "--iperf3",
                                      fake_iperf3(FAKE_RESULT + "print(json.dumps(doc))")])
    assert done.returncode == 0, done.stderr
    client_log = next((tmp_path / "results").glob("*_iperf_mon.log")).read_text()
    missing = tmp_path / "no-such-iperf3"
    done = run_script(SERVER_SCRIPT, ["--iperf3", missing, "-p", free_port(), "--pidfile",
                                      tmp_path / "pid", "--log-file", tmp_path / "server.log"])
    assert done.returncode == 1
    server_log = (tmp_path / "server.log").read_text()
    for text in (client_log, server_log):
        lines = text.splitlines()
        assert lines and all(LOG_LINE_RE.match(line) for line in lines), text


def test_a_failed_run_says_error_as_a_failed_report_does(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = run_script(CLIENT_SCRIPT, ["-c", "127.0.0.1", "-d", blocker / "results"])
    report = run_script(CLIENT_SCRIPT, ["report", "-d", tmp_path / "missing"])
    server = run_script(SERVER_SCRIPT, ["--iperf3", tmp_path / "none", "-p", free_port(),
                                        "--pidfile", tmp_path / "pid", "--log-file",
                                        tmp_path / "server.log"])
    for done, program in ((run, "iperf_client.py"), (report, "iperf_client.py"),
                          (server, "iperf_server.py")):
        assert done.returncode != 0
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(program + ": error: "), done.stderr


# --- The client's validators only validate ---

def parsed(args):
    parser = iperf_client.build_parser()
    ours, extra = iperf_client.split_extra(args)
    options = parser.parse_args(ours)
    options.extra = extra
    return parser, options


def test_check_options_reads_no_targets_file(tmp_path, monkeypatch):
    targets = tmp_path / "targets"
    targets.write_text("127.0.0.1\n")
    read = []
    monkeypatch.setattr(iperf_client, "read_targets_file",
                        lambda path: read.append(path) or ["127.0.0.1\n"])
    parser, options = parsed(["--targets", str(targets)])
    iperf_client.check_options(parser, options)
    assert read == []


def test_run_settings_does_not_run_iperf3(tmp_path, fake_iperf3):
    marker = tmp_path / "ran"
    fake = fake_iperf3("open(%r, 'a').write('ran')\nprint('iperf 3.7 (cJSON 1.5.2)')" % str(
        marker))
    key = tmp_path / "public.pem"
    key.write_text("key")
    parser, options = parsed(["-c", "127.0.0.1", "--iperf3", str(fake), "--username", "u",
                              "--rsa-public-key-path", str(key)])
    iperf_client.check_options(parser, options)
    iperf_client.run_settings(options, {"IPERF3_PASSWORD": "x" * 30})
    assert not marker.exists()


def test_a_long_password_for_an_old_iperf3_is_still_one_line_and_exit_2(tmp_path,
                                                                        fake_iperf3):
    """The version check moved from the validator into the run: same line, same code, nothing
    written."""
    fake = fake_iperf3("print('iperf 3.7 (cJSON 1.5.2)')")
    key = tmp_path / "public.pem"
    key.write_text("key")
    done = run_script(CLIENT_SCRIPT, ["-c", "127.0.0.1", "--iperf3", fake, "-d",
                                      tmp_path / "results", "--username", "u",
                                      "--rsa-public-key-path", key],
                      env={"IPERF3_PASSWORD": "x" * 30})
    assert done.returncode == 2 and "at most 20 characters" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


def test_importing_the_client_leaves_the_umask_alone():
    """The files' mode is computed when a run needs it, not by toggling the umask at import."""
    code = ("import os\ncalls = []\nreal = os.umask\n"
            "os.umask = lambda mask: calls.append(mask) or real(mask)\n"
            "import iperf_client\nprint(calls)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(CLIENT_SCRIPT.parent),
                          stdout=subprocess.PIPE, universal_newlines=True, check=True,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert done.stdout.strip() == "[]"


def test_the_client_holds_no_module_caches():
    assert not hasattr(iperf_client, "_versions")
    assert not hasattr(iperf_client, "FILE_MODE")


# --- The client's effects: one way to lock, an fsync that keeps its promise ---

def test_every_flock_is_taken_by_one_helper():
    """ledger_lock, write_textfile, take_lock and the run's lock all go through locked()."""
    tree = ast.parse(CLIENT_SCRIPT.read_text())
    takers = sorted(node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                    and any(isinstance(call, ast.Attribute) and call.attr == "flock"
                            for call in ast.walk(node)))
    assert takers == ["flock_within", "locked"]


@pytest.mark.parametrize("error, raised", [(errno.EIO, True), (errno.ENOSPC, True),
                                           (errno.EINVAL, False)])
def test_fsync_of_the_folder_fails_loudly_but_where_it_cannot_be_done(tmp_path, monkeypatch,
                                                                      error, raised):
    def failing(fd):
        raise OSError(error, os.strerror(error))
    monkeypatch.setattr(iperf_client.os, "fsync", failing)
    if raised:
        with pytest.raises(OSError):
            iperf_client._fsync_dir(str(tmp_path))
    else:
        iperf_client._fsync_dir(str(tmp_path))


def test_a_folder_that_cannot_be_opened_is_no_silent_success(tmp_path):
    with pytest.raises(OSError):
        iperf_client._fsync_dir(str(tmp_path / "gone"))
