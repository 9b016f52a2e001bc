"""iperf_server.py with authentication: keys, users file, and a daemon that checks credentials."""

import hashlib
import os
import stat
import subprocess
import sys

import pytest

import iperf_server
from conftest import (SERVER_SCRIPT, assert_one_line_error, assert_quiet_success,
                      client_login_broken, run_script)


def run_with_stdin(args, text):
    return subprocess.run([sys.executable, str(SERVER_SCRIPT), *args], input=text,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


@pytest.fixture
def keys(tmp_path):
    done = run_script(SERVER_SCRIPT, ["--make-keys", tmp_path / "keys"])
    assert done.returncode == 0, done.stderr
    return tmp_path / "keys" / "private.pem", tmp_path / "keys" / "public.pem"


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users.csv"
    done = run_with_stdin(["--add-user", "alice", "--authorized-users-path", str(path)],
                          "s3cret\n")
    assert done.returncode == 0, done.stderr
    return path


def test_make_keys_creates_a_private_key_only_its_owner_reads(keys):
    private, public = keys
    assert mode(private) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    derived = subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True, check=True).stdout
    assert derived == public.read_text()


def test_make_keys_never_overwrites(keys):
    private, public = keys
    before = private.read_bytes(), public.read_bytes()
    done = run_script(SERVER_SCRIPT, ["--make-keys", private.parent])
    assert_one_line_error(done, 1, str(private), "not overwriting")
    assert (private.read_bytes(), public.read_bytes()) == before
    assert sorted(os.listdir(str(private.parent))) == ["private.pem", "public.pem"]


def test_make_keys_without_openssl(tmp_path):
    done = run_script(SERVER_SCRIPT, ["--make-keys", tmp_path / "k"], env={"PATH": "/nowhere"})
    assert_one_line_error(done, 1, "openssl not found")


def test_add_user_writes_what_iperf3_reads(users):
    expected = hashlib.sha256(b"{alice}s3cret").hexdigest()
    assert users.read_text() == "alice,%s\n" % expected
    assert mode(users) == 0o600


def test_add_user_replaces_the_entry_and_keeps_the_rest(users):
    users.write_text("# our testers\n" + users.read_text() + "bob,abc\n")
    done = run_with_stdin(["--add-user", "alice", "--authorized-users-path", str(users)],
                          "n3w\n")
    assert done.returncode == 0 and "replaced" in done.stdout
    lines = users.read_text().splitlines()
    assert lines == ["# our testers", "bob,abc",
                     "alice," + hashlib.sha256(b"{alice}n3w").hexdigest()]


def test_add_user_keeps_the_files_owner(users):
    """root adding a user must not make the file unreadable for a daemon run as another user."""
    os.chown(str(users), 65534, 65534)
    done = run_with_stdin(["--add-user", "bob", "--authorized-users-path", str(users)], "pw\n")
    assert done.returncode == 0, done.stderr
    info = os.stat(str(users))
    assert (info.st_uid, info.st_gid, mode(users)) == (65534, 65534, 0o600)


def test_add_user_refuses_a_password_that_is_not_text(tmp_path):
    path = tmp_path / "users.csv"
    done = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--add-user", "x",
                           "--authorized-users-path", str(path)], input=b"\xff\xfe\n",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert not path.exists()


@pytest.mark.parametrize("name,password,fragment", [
    ("al,ice", "pw", "commas"), ("al ice", "pw", "whitespace"), ("alice", "pass word", "password"),
    ("alice", "", "empty password"), ("#bob", "pw", "comment"),
])
def test_add_user_refuses_what_iperf3_cannot_carry(tmp_path, name, password, fragment):
    path = tmp_path / "users.csv"
    done = run_with_stdin(["--add-user", name, "--authorized-users-path", str(path)],
                          password + "\n")
    assert_one_line_error(done, 2, fragment)
    assert not path.exists()


def test_add_user_needs_the_users_file():
    done = run_with_stdin(["--add-user", "alice"], "pw\n")
    assert done.returncode == 2 and "--authorized-users-path" in done.stderr


def auth_args(keys, users):
    return ["--rsa-private-key-path", str(keys[0]), "--authorized-users-path", str(users)]


def test_probe_leaves_an_authenticating_server_alone(host, keys, users, iperf3):
    assert_quiet_success(host.run(*auth_args(keys, users)))
    pid = host.pid()
    argv = iperf_server.daemon_argv_of(pid, host.pidfile)
    assert argv[argv.index("--rsa-private-key-path") + 1] == str(keys[0])
    assert_quiet_success(host.run("-v", *auth_args(keys, users)))
    assert host.pid() == pid
    assert "answered (authentication required)" in host.log()
    done = host.run("--status", *auth_args(keys, users))
    assert done.returncode == 0, done.stdout

    # The daemon really checks: the right password passes, a wrong one is refused.
    def client(password):
        env = dict(os.environ, IPERF3_PASSWORD=password)
        return subprocess.run([iperf3, "-c", "127.0.0.1", "-p", str(host.port), "-n", "1K", "-i",
                               "0.1", "-J", "--username", "alice", "--rsa-public-key-path",
                               str(keys[1])], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=30)
    if not client_login_broken(iperf3):  # else CLIENT_LOGIN_BUG: the daemon still answers
        assert '"sum_received"' in client("s3cret").stdout
    # 3.7-3.18 say "test authorization failed" (3.9 on stderr only); 3.21 closes the socket.
    refused = client("wrong").stdout
    assert "authorization failed" in refused or "control socket has closed" in refused
    assert '"sum_received"' not in refused


def test_adding_authentication_restarts_the_daemon(host, keys, users):
    assert_quiet_success(host.run())
    old = host.pid()
    assert_quiet_success(host.run(*auth_args(keys, users)))
    assert host.pid() != old
    assert "settings changed" in host.log()


def test_private_key_readable_by_others_is_refused(host, keys, users):
    os.chmod(str(keys[0]), 0o644)
    done = host.run(*auth_args(keys, users))
    assert_one_line_error(done, 1, "chmod 600 %s" % keys[0])
    assert host.daemons() == []


def test_missing_users_file_is_named(host, keys, tmp_path):
    missing = tmp_path / "nobody.csv"
    done = host.run(*auth_args(keys, missing))
    assert_one_line_error(done, 1, str(missing))
    assert host.daemons() == []


def test_iperf3_without_authentication_is_refused(host, keys, users, fake_iperf3):
    fake = fake_iperf3("""
        print("iperf 3.1.3\\nOptional features available: CPU affinity setting")
    """)
    done = host.run("--iperf3", str(fake), *auth_args(keys, users))
    assert_one_line_error(done, 1, "built without authentication")


def test_one_auth_flag_alone_is_a_usage_error(host, keys):
    done = host.run("--rsa-private-key-path", str(keys[0]))
    assert done.returncode == 2 and "go together" in done.stderr
    assert "Traceback" not in done.stderr
