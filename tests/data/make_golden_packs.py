"""How tests/data/golden/ was made: a tiny base, a tuned copy, and the packs skillhub made of them.

The packs were written by the skillhub of the commit that added this script, before the
package was reorganised into folders; tests/test_golden.py checks that today's pipeline
still writes them bit for bit. Kept so the files can be regenerated deliberately (a format
change), never to make the test pass:

    python tests/data/make_golden_packs.py tests/data/golden
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from skillhub import create_pack
from skillhub.demo.synthetic import build_tiny_model
from skillhub.io.tensorfile import TensorFile

# Operators whose arithmetic is element-wise or a selection: the same bits on every CPU.
PORTABLE_RECIPE = {"name": "portable", "rules": [
    {"match": {"role": ["embedding", "head"]}, "operator": "magnitude-prune", "params": {"keep": 0.25, "bits": 4}},
    {"match": {"role": "attention"}, "operator": "rtn", "params": {"bits": 3, "group_size": 16}},
    {"match": {"role": "mlp"}, "operator": "magnitude-prune", "params": {"keep": 0.5, "bits": 16, "index": "gaps"}},
    {"match": {"role": ["norm", "bias", "other"]}, "operator": "raw"},
]}

root = Path(sys.argv[1])
shutil.rmtree(root, ignore_errors=True)
base = build_tiny_model(root / "base", seed=7, layers=1, hidden=32, intermediate=64)
tuned = shutil.copytree(base, root / "tuned")
weights = TensorFile(base / "model.safetensors")
generator = torch.Generator().manual_seed(11)
changed = {}
for name in weights.keys():
    tensor = weights.read(name).clone()
    if "post_attention_layernorm" not in name:  # one tensor stays as it was: the manifest lists it unchanged
        tensor += 0.02 * torch.randn(tensor.shape, generator=generator)
    changed[name] = tensor
save_file(changed, tuned / "model.safetensors", metadata={"format": "pt"})
create_pack(base, tuned, root / "portable", task="golden", recipe=PORTABLE_RECIPE)
create_pack(base, tuned, root / "paper", task="golden")
for pack in ("portable", "paper"):
    (root / pack / ".skillhub-output.json").unlink()
