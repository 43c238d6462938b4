"""The core (EMA, save, load) needs only torch and safetensors: checkpoints must work without numpy."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.modules["numpy"] = None  # any import of numpy now raises ImportError
import torch, polyak
model = torch.nn.Linear(4, 3)
ema = polyak.EMA(model, decay=0.9)
ema.update()
for name in ("a.safetensors", "b.pt"):
    path = sys.argv[1] + "/" + name
    polyak.save(path, ema, model=model)
    again = polyak.EMA(torch.nn.Linear(4, 3), decay=0.9)
    polyak.load(path, again)
    assert torch.equal(again.averaged_state_dict()["weight"], ema.averaged_state_dict()["weight"]), name
print("ok")
"""


def test_save_and_load_without_numpy(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
