"""The generated model card (README.md) of a SkillPack, with Hugging Face Hub front matter."""

from __future__ import annotations

import json
from typing import Any

from skillhub.pack.manifest import Manifest


def render_card(document: dict[str, Any]) -> str:
    """Markdown model card for a pack: Hub YAML front matter, then what it is and how to use it."""
    manifest = Manifest(document)
    base = manifest["base"]  # shown as recorded, every key
    totals = manifest["totals"]
    modules = manifest.modules().values()
    operators = sorted({m.operator for m in modules})
    tags = ["skillhub", "skillpack", f"task:{manifest.task}", *(f"operator:{op}" for op in operators)]
    front = [
        "---",
        "library_name: skillhub",
        f"base_model: {json.dumps(base['id'])}",
        "base_model_relation: adapter",
        "tags:",
        *(f"- {json.dumps(tag)}" for tag in tags),
        "---",
    ]
    by_role: dict[str, list[int]] = {}
    for module in modules:
        stored, full = by_role.setdefault(module.role, [0, 0])
        by_role[module.role] = [stored + module.stored_bytes, full + module.delta_fp16_bytes]
    rows = [
        f"| {role} | {stored:,} | {full:,} | {stored / full:.2%} |" for role, (stored, full) in sorted(by_role.items())
    ]
    body = f"""
# SkillPack `{manifest['name']}` {manifest['version']}

A compressed parameter delta (a *SkillPack*) that teaches **{base['id']}** the task
**{manifest['task']}**, made with [skillhub](https://github.com/skillhub/skillhub) after the GraftLLM
method (arXiv 2505.18502). Adding it to the base model gives back the fine-tuned model up to
the compression error below; removing it gives back the base model exactly.

- Base model: `{base['id']}` (revision `{base['revision'] or 'local'}`, {base['architecture']})
- Base fingerprint: `{base['fingerprint']}` (checked before the pack is applied)
- Recipe: `{manifest['recipe']['name']}`, quantizer `{manifest['quantizer']['method']}`
- Size: {totals['stored_bytes']:,} bytes stored for a {totals['delta_fp16_bytes']:,}-byte float16 delta
  (ratio {totals['ratio']:.2%}), relative reconstruction error {totals.get('relative_error', 0.0):.4f}

| role | stored bytes | fp16 delta bytes | ratio |
|---|---:|---:|---:|
{chr(10).join(rows)}

## Use

```bash
pip install skillhub
skillhub apply {base['id']} ./this-pack -o ./{manifest['task']}-model
```

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("./{manifest['task']}-model")
```
"""
    return "\n".join(front) + "\n" + body
