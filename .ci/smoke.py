"""Smoke test of an installed wheel, run by `make package` in a clean virtual environment.

Catches what the editable install used by the tests cannot: a module or package-data file missing from
the wheel, a dependency missing from its metadata, a broken console script.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

import torch

import polyak

here = pathlib.Path(polyak.__file__).resolve()
if "site-packages" not in here.parts:
    sys.exit(f"smoke test imported polyak from {here}, not from the installed wheel")
if not (here.parent / "py.typed").is_file():
    sys.exit("the wheel has no py.typed marker")

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
ema = polyak.EMA(model, decay=0.5)
with torch.no_grad():
    model.weight.add_(1.0)
ema.update()
expected = (model.weight - 0.5).detach()  # 0.5 * old + 0.5 * new, old = new - 1
got = ema.averaged_state_dict()["weight"]
if not torch.allclose(got, expected):
    sys.exit("one update did not give 0.5 * old + 0.5 * new")

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ckpt.safetensors")
    polyak.save(path, ema, model=model)
    fresh = polyak.EMA(torch.nn.Linear(4, 2), decay=0.5)
    polyak.load(path, fresh)
    if not torch.equal(fresh.averaged_state_dict()["weight"], got):
        sys.exit("save/load did not round-trip the average")

script = pathlib.Path(sys.executable).with_name("polyak")
for args in (["--help"], ["--version"]):
    out = subprocess.run([str(script), *args], capture_output=True, text=True, check=True).stdout
    if not out.strip():
        sys.exit(f"`polyak {' '.join(args)}` printed nothing")
version = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True).stdout.split()
if version != ["polyak", polyak.__version__]:
    sys.exit(f"`polyak --version` says {version}, polyak.__version__ is {polyak.__version__}")
print(f"smoke test passed: polyak {polyak.__version__} from {here.parent}")
