"""A command forked from the pre-imported Python (tests/preloaded_python.py) behaves as it does in a new interpreter:
arguments, folder, environment, ``sys.path``, streams, exit status and exit functions; none of this repository's code
is imported before the command runs; commands it cannot give a faithful start run as ordinary subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import preloaded_python
import pytest
from conftest import REPO

PROBE = """
import atexit, json, os, sys
atexit.register(lambda: print("exit functions ran", flush=True))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "mine": os.environ.get("MINE"),
                  "kit": "swin_unetr_kit" in sys.modules, "pythonpath": sys.path[1]}))
sys.stderr.write("to stderr\\n")
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "scripts" / "probe.py"
    path.parent.mkdir()
    path.write_text(PROBE)
    return path


@pytest.mark.parametrize("form", ["script", "-c", "-m"])
def test_a_forked_command_sees_what_a_new_interpreter_would(form, script, tmp_path):
    cmd = {
        "script": [sys.executable, str(script), "3", "x"],
        "-c": [sys.executable, "-c", PROBE, "3", "x"],
        "-m": [sys.executable, "-m", "probe", "3", "x"],
    }[form]
    env = {**os.environ, "MINE": "mine", "PYTHONPATH": str(script.parent)}
    assert preloaded_python.why_fresh(cmd, env) is None, preloaded_python.why_fresh(cmd, env)
    forked = preloaded_python.popen(cmd, cwd=tmp_path, env=env)
    stdout, stderr = forked.communicate(timeout=60)
    fresh = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert (forked.returncode, stdout, stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    seen = json.loads(stdout.splitlines()[0])
    assert seen["argv"][1:] == ["3", "x"] and seen["mine"] == "mine" and seen["cwd"] == str(tmp_path)
    assert seen["kit"] is False  # the repository's own code is imported by the command, never beforehand
    assert stdout.splitlines()[-1] == "exit functions ran" and stderr == "to stderr\n"


def test_exceptions_and_signals_end_a_forked_command_as_they_end_an_interpreter(tmp_path):
    failing = preloaded_python.run([sys.executable, "-c", "raise ValueError('broken input')"], timeout=60)
    assert failing.returncode == 1 and failing.stderr.splitlines()[-1] == "ValueError: broken input"
    message = preloaded_python.run([sys.executable, "-c", "import sys; sys.exit('refused')"], timeout=60)
    assert (message.returncode, message.stderr) == (1, "refused\n")
    sleeper = preloaded_python.popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sleeper.send_signal(signal.SIGKILL)
    assert sleeper.wait(timeout=30) == -signal.SIGKILL
    with pytest.raises(subprocess.TimeoutExpired):
        preloaded_python.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_start_up_settings_are_those_of_the_command(threads):
    """Thread counts are read as torch starts: a command with other settings gets a pre-imported Python of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    cmd = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    assert preloaded_python.why_fresh(cmd, env) is None
    forked = preloaded_python.popen(cmd, env=env)
    assert isinstance(forked, preloaded_python.ForkedProcess)
    assert forked.communicate(timeout=120)[0] == f"{threads}\n"


def test_other_programs_and_the_commands_as_typed_get_a_new_interpreter(monkeypatch):
    assert isinstance(preloaded_python.popen(["true"]), subprocess.Popen)
    monkeypatch.setattr(preloaded_python, "fresh_interpreters", True)
    assert "as typed" in preloaded_python.why_fresh([sys.executable, "-c", "pass"])
    assert isinstance(preloaded_python.popen([sys.executable, "-c", "pass"]), subprocess.Popen)


def test_the_tests_of_the_commands_as_typed_exist():
    import conftest

    for prefix in conftest.AS_TYPED:
        file_name, _, test_name = prefix.partition("::")
        assert (REPO / file_name).is_file() and f"def {test_name}" in (REPO / file_name).read_text()
