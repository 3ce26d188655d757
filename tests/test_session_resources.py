"""The session's expensive resources (the micro-CLIP testbed, Label Studio) are built before
the first test starts, outside pytest-timeout's per-test timer: on a busy machine a build of
many minutes then delays the run instead of erroring every test that shares it.

The check runs a pytest session of its own, in a subprocess, with the project's conftests
loaded as plugins and the slow parts (training, starting Label Studio) replaced by probes
that record whether a per-test timer was running when they were called: pytest-timeout
arms ITIMER_REAL around each test (setup included) and disarms it between tests. No timing
is involved: the answer is the same on an idle and on a saturated machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBES = '''
import signal, sys, types

def timer_left():
    """Seconds left on pytest-timeout's per-test timer; 0.0 when none is running."""
    return signal.getitimer(signal.ITIMER_REAL)[0]

def train(cache_dir, family="clip"):
    return {"timer_left": timer_left()}

for name in ("tests.support.microclip", "tests.support.microclip_cache"):
    testbed = types.ModuleType(name)
    testbed.ensure_micro_clip = testbed.ensure_usable_micro_clip = train
    sys.modules[name] = testbed

class NotInstalled(RuntimeError):
    pass

class Server:
    def __init__(self, **options):
        self.timer_left = timer_left()
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return None

class Client(Server):
    @classmethod
    def for_server(cls, server):
        return cls()

label_studio = types.ModuleType("tests.e2e.label_studio")
label_studio.LabelStudioServer, label_studio.LabelStudioClient = Server, Client
label_studio.LabelStudioNotInstalled, label_studio.find_label_studio = NotInstalled, lambda: None
sys.modules[label_studio.__name__] = label_studio

pytest_plugins = ["tests.conftest", "tests.e2e.conftest"]
'''

TESTS = '''
def test_first_user_of_the_testbed(micro_clip):
    assert micro_clip["timer_left"] == 0.0, "trained under a per-test timeout"

def test_second_user_of_the_testbed(micro_clip):
    assert micro_clip["timer_left"] == 0.0

def test_first_user_of_label_studio(label_studio):
    server, _ = label_studio
    assert server.timer_left == 0.0, "started under a per-test timeout"

def test_not_using_them():
    pass
'''


def run_session(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (directory / "pytest.ini").write_text("[pytest]\ntimeout = 900\ntimeout_method = signal\n")
    (directory / "conftest.py").write_text(textwrap.dedent(PROBES))
    (directory / "test_inner.py").write_text(textwrap.dedent(TESTS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TESTBED_CACHE": str(directory / "cache")}
    env.pop("SKIP_E2E", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args, str(directory)],
        cwd=directory, env=env, capture_output=True, text=True, timeout=300)


def test_testbed_and_label_studio_are_built_before_any_per_test_timer(tmp_path: Path) -> None:
    result = run_session(tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout, result.stdout
    assert "micro-CLIP testbed" in result.stdout and "ready after" in result.stdout


def test_nothing_is_built_for_a_run_that_does_not_need_it(tmp_path: Path) -> None:
    result = run_session(tmp_path, "-k", "not_using")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "preparing" not in result.stdout, result.stdout
