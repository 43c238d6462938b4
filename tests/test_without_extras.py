"""`pip install polyak` alone (torch + safetensors): the command line must still answer, and a command
whose extra is missing must say which extra to install, in one line, with exit code 2."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["numpy"] = None  # as if numpy (and so every extra) were not installed
from polyak.cli import main
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("smooth", main(["smooth", "log.csv", "--column", "loss"]))
print("demo", main(["demo", "--out", sys.argv[1]]))
"""


def test_cli_without_numpy(tmp_path: object) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == ["smooth 2", "demo 2"]
    errors = done.stderr.strip().splitlines()
    assert errors == [
        "polyak smooth: error: it needs 'numpy', which is not installed; install the extra: pip install 'polyak[series]'",
        "polyak demo: error: it needs 'numpy', which is not installed; install the extra: pip install "
        "'polyak[experiments]'",
    ]
