"""The built wheel carries schemas/, registry/ migrations and the operator entry points, not only the checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from importlib import metadata
import skillhub
from skillhub.schemas import load_schema, validate
from skillhub.errors import PackError
assert skillhub.__file__.startswith(sys.argv[1]), skillhub.__file__
manifest = json.loads(open(sys.argv[2]).read())
validate(manifest, "skillpack", error=PackError, what="probe")
names = sorted(ep.name for ep in metadata.entry_points(group="skillhub.operators"))
from skillhub.migrations import migration_names
print(json.dumps({"schemas": [load_schema(n)["title"] for n in ("skillpack", "recipe")], "operators": names,
                  "migrations": migration_names()}))
"""


def test_wheel_installs_schemas_and_entry_points(tmp_path: Path, paper_pack) -> None:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("skillhub-*.whl"))
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    fresh_python = env_dir / "bin" / "python"
    subprocess.run([str(fresh_python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    fresh_site = subprocess.run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies (jsonschema...) come from the test environment, placed *after* the fresh
    # site-packages so that skillhub itself can only come from the installed wheel.
    deps = sysconfig.get_paths()["purelib"]
    probe = subprocess.run(
        [str(fresh_python), "-c", f"import sys; sys.path.append({deps!r}); exec({PROBE!r})",
         fresh_site, str(paper_pack.path / "skillpack.json")],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    found = json.loads(probe.stdout)
    assert found["schemas"] == ["SkillPack manifest (format version 1)", "skillhub compression recipe"]
    assert found["operators"] == ["lowrank", "magnitude-prune", "raw", "rtn", "svd", "svd-mixed"]
    assert found["migrations"] == ["m0001_initial", "m0002_evaluation"]
