import os

import torch
from hypothesis import settings

torch.set_num_threads(2)

# CI replays the same hypothesis examples on every run (a red CI must be reproducible); local runs keep
# drawing new examples, so a property test keeps searching for counterexamples between commits.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
