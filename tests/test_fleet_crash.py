"""Crash safety of installs: SIGKILL the installing process at random moments and at every step boundary;
afterwards the installed model always verifies and is exactly v1 or v2, and a rerun finishes the update.

The installs run in processes forked from a warm "zygote" (imports done once, no torch op run before the fork),
so dozens of kills take seconds, not minutes of interpreter start-up.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tuf")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash harness forks installs (POSIX only)")

from freezepack import api  # noqa: E402
from freezepack.fleet import Device  # noqa: E402
from freezepack.testing.fleet import Fleet, record, write_fpk  # noqa: E402

ZYGOTE = textwrap.dedent("""
    import json, os, signal, sys, time, traceback
    import torch, freezepack.api, freezepack.fleet   # warm imports, shared by every forked install
    from freezepack.fleet import Device
    repo, device = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            if cmd.get("failpoint"):
                os.environ["FREEZEPACK_FLEET_FAILPOINT"] = cmd["failpoint"]
            try:
                Device(device).install(repo, "net")
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(3)
        if cmd.get("delay") is not None:
            time.sleep(cmd["delay"])
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status, "elapsed": time.perf_counter() - t0}), flush=True)
""")

FAILPOINTS = ["after-download", "after-assemble", "after-pending", "after-keep-previous", "after-replace"]


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Zygote:
    def __init__(self, repo, device):
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE, repo, device], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def run(self, delay=None, failpoint=None) -> dict:
        self.p.stdin.write(json.dumps({"delay": delay, "failpoint": failpoint}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self):
        self.p.stdin.close()
        self.p.wait(30)


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    # a bigger model than elsewhere so the install has many distinct moments to die in
    v1 = write_fpk(base / "v1.fpk", record(density=0.3))
    v2 = write_fpk(base / "v2.fpk", record(density=0.3, value_seed=1))
    f = Fleet(base)
    f.publish(v1)
    f.install()
    pristine = str(base / "pristine")
    shutil.copytree(f.device.dir, pristine)     # the device with v1 installed, to restart from
    f.publish(v2)
    zygote = Zygote(f.repo, f.device.dir)
    yield f, pristine, {sha(v1): 1, sha(v2): 2}, zygote
    zygote.close()


def reset(device: Device, pristine: str) -> None:
    shutil.rmtree(device.dir)
    shutil.copytree(pristine, device.dir)


def check_installed(device: Device, releases: dict) -> int:
    """The installed file is exactly one of the releases, verifies, and the device reports it correctly."""
    path = device.model_path("net")
    digest = sha(path)
    assert digest in releases, "torn or unknown model file after a crash"
    assert api.verify(path)["ok"]
    assert device.status("net")["release"] == releases[digest]
    return releases[digest]


@pytest.mark.slow
def test_sigkill_at_every_install_step(crash_setup):
    f, pristine, releases, zygote = crash_setup
    for point in FAILPOINTS:
        reset(f.device, pristine)
        out = zygote.run(failpoint=point)
        assert os.WIFSIGNALED(out["status"]) and os.WTERMSIG(out["status"]) == 9, point
        got = check_installed(f.device, releases)
        assert got == (2 if point == "after-replace" else 1), point
        assert zygote.run()["status"] == 0                       # the rerun completes the update
        assert check_installed(f.device, releases) == 2
        assert f.device.status("net")["previous_release"] == 1, point
        assert not [p for p in os.listdir(f.device.dir) if ".part-" in p]


@pytest.mark.slow
def test_sigkill_at_random_moments_many_times(crash_setup):
    f, pristine, releases, zygote = crash_setup
    reset(f.device, pristine)
    clean = zygote.run()
    assert clean["status"] == 0 and check_installed(f.device, releases) == 2
    duration = clean["elapsed"]
    rng = random.Random(1234)
    seen = {1: 0, 2: 0}
    for _ in range(40):
        out = zygote.run(delay=rng.uniform(0, 1.2 * duration))
        assert out["status"] == 0 or os.WTERMSIG(out["status"]) == 9
        got = check_installed(f.device, releases)
        seen[got] += 1
        if got == 2:
            reset(f.device, pristine)      # start the next update from v1 (staged pieces are kept otherwise)
    print("random kills left release", seen)
    assert seen[1] > 0 and seen[2] > 0, seen   # kills landed both before and after the switch
    assert zygote.run()["status"] == 0 and check_installed(f.device, releases) == 2
