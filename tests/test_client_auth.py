"""iperf_client.py against a real authenticating iperf3 server: the password travels only
through iperf3's environment, and a run without one fails fast instead of hanging on a prompt."""

import csv
import os
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import (CLIENT_LOGIN_BUG, CLIENT_SCRIPT, QUICK, add_user,
                      assert_one_line_error, client_login_broken, paced, run_script)

PASSWORD = "Corr3ct-Horse_batter"  # 20 characters: the most iperf3 3.7 takes
USER = "tester"


def all_argvs():
    """The argv of every process this machine shows, as bytes."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    found.append(handle.read())
            except OSError:
                pass
    return found


@pytest.fixture(scope="session")
def openssl_keys(tmp_path_factory):
    """A key pair made by openssl directly, as an admin without the script would, once a
    worker."""
    folder = tmp_path_factory.mktemp("openssl-keys")
    private, public = folder / "private.pem", folder / "public.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout", "-out", str(public)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(str(private), 0o600)
    return folder


@pytest.fixture(params=["script", "openssl"])
def keys(request, worker_credentials, openssl_keys, tmp_path):
    """This test's copy of RSA keys made by iperf_server.py --make-keys, or by openssl."""
    made = worker_credentials / "keys" if request.param == "script" else openssl_keys
    folder = tmp_path / "keys"
    shutil.copytree(str(made), str(folder))
    return folder / "private.pem", folder / "public.pem"


@pytest.fixture
def auth_server(keys, tmp_path, start_iperf3_server):
    users = tmp_path / "users.csv"
    add_user(users, USER, PASSWORD)
    server = start_iperf3_server(["--rsa-private-key-path", str(keys[0]),
                                  "--authorized-users-path", str(users)])
    server.public_key = keys[1]
    return server


def auth_args(server, results, *more):
    return paced(["--server", "127.0.0.1", "--port", server.port, *QUICK, "-P", "2", "-d",
                  results, "--username", USER, "--rsa-public-key-path", server.public_key,
                  *more])


def ledger(results):
    with open(str(results / "results.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def files_containing(folder, secret):
    return [name for name in os.listdir(str(folder))
            if secret.encode() in (folder / name).read_bytes()]


@pytest.fixture
def working_login(iperf3):
    """Skips where this iperf3's client cannot log in at all (its own bug, named)."""
    if client_login_broken(iperf3):
        pytest.skip(CLIENT_LOGIN_BUG)


@pytest.mark.slow
def test_right_password_from_the_environment(auth_server, tmp_path, working_login):
    results = tmp_path / "results"
    seen = []
    stop = threading.Event()

    def watch():  # every process's argv, all through the run
        while not stop.is_set():
            seen.extend(argv for argv in all_argvs() if PASSWORD.encode() in argv)
            stop.wait(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        done = run_script(CLIENT_SCRIPT, auth_args(auth_server, results, "-vv"),
                          env={"IPERF3_PASSWORD": PASSWORD})
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stderr
    assert [row["status"] for row in ledger(results)] == ["ok", "ok"]
    assert seen == [], "the password appeared in a process's argv"
    assert PASSWORD not in done.stdout + done.stderr
    assert files_containing(results, PASSWORD) == []


@pytest.mark.slow
def test_right_password_from_a_file(auth_server, tmp_path, working_login):
    results = tmp_path / "results"
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\nignored second line\n")
    os.chmod(str(password_file), 0o600)
    env = dict(os.environ)
    env.pop("IPERF3_PASSWORD", None)
    done = subprocess.run([sys.executable, str(CLIENT_SCRIPT),
                           *map(str, auth_args(auth_server, results, "--password-file",
                                               password_file))],
                          env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [row["status"] for row in ledger(results)] == ["ok", "ok"]
    assert files_containing(results, PASSWORD) == []


def test_wrong_password_is_a_failed_test_that_says_why(auth_server, tmp_path, iperf3):
    results = tmp_path / "results"
    done = run_script(CLIENT_SCRIPT, auth_args(auth_server, results),
                      env={"IPERF3_PASSWORD": "not-it"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr  # one line per direction
    for line, direction in zip(lines, ("forward", "reverse")):
        assert direction in line
        if client_login_broken(iperf3):
            assert "cannot log in at all" in line and "3.21" in line
        else:
            assert "login refused" in line and "clock" in line
    assert [row["status"] for row in ledger(results)] == ["error", "error"]
    assert "not-it" not in done.stderr
    assert files_containing(results, "not-it") == []


def test_missing_password_without_a_terminal_exits_2_at_once(auth_server, tmp_path):
    results = tmp_path / "results"
    env = dict(os.environ)
    env.pop("IPERF3_PASSWORD", None)
    done = subprocess.run([sys.executable, str(CLIENT_SCRIPT),
                           *map(str, auth_args(auth_server, results))],
                          env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=20)
    assert_one_line_error(done, 2, "IPERF3_PASSWORD", "--password-file")
    assert not results.exists()


def test_password_file_readable_by_others_is_refused(auth_server, tmp_path):
    results = tmp_path / "results"
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    os.chmod(str(password_file), 0o644)
    done = run_script(CLIENT_SCRIPT, auth_args(auth_server, results, "--password-file",
                                               password_file))
    assert_one_line_error(done, 2, str(password_file), "chmod 600")
    assert PASSWORD not in done.stderr
    assert not results.exists()


def test_dry_run_never_shows_the_password(auth_server, tmp_path):
    done = run_script(CLIENT_SCRIPT, auth_args(auth_server, tmp_path / "r", "--dry-run"),
                      env={"IPERF3_PASSWORD": PASSWORD})
    assert done.returncode == 0, done.stderr
    assert "--username %s" % USER in done.stdout
    assert PASSWORD not in done.stdout + done.stderr


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


@pytest.mark.parametrize("banner,code", [("iperf 3.7 (cJSON 1.5.2)", 2),
                                         ("iperf 3.9 (cJSON 1.7.13)", 0)])
def test_credentials_too_long_for_iperf3_3_7_are_refused_at_once(tmp_path, fake_iperf3, banner,
                                                                 code):
    """3.7 refuses more than 20 characters of user name or password at every test."""
    fake = fake_iperf3("print(%r)" % banner)
    key = tmp_path / "public.pem"
    key.write_text("not read in a dry run\n")
    done = run_script(CLIENT_SCRIPT, ["--server", "h", "--username", USER, "--iperf3", fake,
                                      "--rsa-public-key-path", key, "--dry-run"],
                      env={"IPERF3_PASSWORD": "x" * 21})
    assert done.returncode == code, done.stderr
    if code:
        assert_one_line_error(done, 2, "at most 20 characters", "password has 21")
