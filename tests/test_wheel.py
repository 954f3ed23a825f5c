"""The built wheels: skillhub's carries schemas/, registry/ migrations and the operator entry
points, not only the checkout; the plugins' install and uninstall with pip like any package."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = ["skillhub-dare", "skillhub-bitdelta"]
# Our own distributions, which the fresh environment must get from the wheels only.
OURS = ("skillhub", "skillhub_dare", "skillhub_bitdelta", "__editable__")

PROBE = """
import json, sys
from importlib import metadata
import skillhub
from skillhub.pack.schemas import load_schema, validate
from skillhub.errors import PackError
assert skillhub.__file__.startswith(sys.argv[1]), skillhub.__file__
manifest = json.loads(open(sys.argv[2]).read())
validate(manifest, "skillpack", error=PackError, what="probe")
names = sorted(ep.name for ep in metadata.entry_points(group="skillhub.operators") if ep.dist.name == "skillhub")
from skillhub.registry.migrations import migration_names
print(json.dumps({"schemas": [load_schema(n)["title"] for n in ("skillpack", "recipe")], "operators": names,
                  "migrations": migration_names()}))
"""


class FreshEnvironment:
    """A new venv holding only our wheels; third-party dependencies come from the test
    environment through a directory of links that leaves our own distributions out."""

    def __init__(self, root: Path) -> None:
        venv.create(root / "venv", with_pip=True)
        self.python = root / "venv" / "bin" / "python"
        self.site = self.run("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
        self.deps = root / "deps"
        self.deps.mkdir()
        for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
            if not entry.name.lower().startswith(OURS):
                (self.deps / entry.name).symlink_to(entry)

    def run(self, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python), *args], check=check, capture_output=True, text=True, cwd=cwd)

    def pip(self, *args: str) -> None:
        self.run("-m", "pip", "--disable-pip-version-check", "-q", *args)

    def python_code(self, code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        # Placed *after* the fresh site-packages, so our packages can only come from the wheels.
        return self.run("-c", f"import sys; sys.path.append({str(self.deps)!r}); {code}", *args, check=False, cwd=cwd)

    def skillhub(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return self.python_code("from skillhub.cli import main; sys.argv[0] = 'skillhub'; main()", *args, cwd=cwd)


def build_wheel(source: Path, distribution: str, outdir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(source)],
                   check=True, capture_output=True)
    return next(outdir.glob(f"{distribution.replace('-', '_')}-*.whl"))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> FreshEnvironment:
    root = tmp_path_factory.mktemp("wheels")
    wheels = [build_wheel(REPO, "skillhub", root / "dist")]
    wheels += [build_wheel(REPO / "plugins" / p, p, root / "dist") for p in PLUGINS]
    env = FreshEnvironment(root)
    env.pip("install", "--no-deps", *map(str, wheels))
    return env


def test_wheel_installs_schemas_and_entry_points(fresh: FreshEnvironment, paper_pack, tmp_path: Path) -> None:
    probe = fresh.python_code(f"exec({PROBE!r})", fresh.site, str(paper_pack.path / "skillpack.json"), cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["schemas"] == ["SkillPack manifest (format version 1)", "skillhub compression recipe"]
    assert found["operators"] == ["lowrank", "magnitude-prune", "raw", "rtn", "svd", "svd-mixed"]
    assert found["migrations"] == ["m0001_initial", "m0002_evaluation", "m0003_routing", "m0004_lm_eval", "m0005_prompt_format"]


def test_plugin_wheels_install_and_uninstall(fresh: FreshEnvironment, plugin_pack, finetuned, tmp_path: Path) -> None:
    listed = fresh.skillhub("plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)["operators"]}
    assert {rows[n]["distribution"] for n in ("dare", "bitdelta")} == set(PLUGINS)
    assert all(r["status"] == "ok" for r in rows.values())
    applied = fresh.skillhub("apply", str(finetuned.base), str(plugin_pack.path), "-o", str(tmp_path / "a"), cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr

    fresh.pip("uninstall", "-y", "skillhub-dare")
    listed = fresh.skillhub("plugins", "--json", cwd=tmp_path)
    assert {r["name"] for r in json.loads(listed.stdout)["operators"]} == set(rows) - {"dare"}
    failed = fresh.skillhub("apply", str(finetuned.base), str(plugin_pack.path), "-o", str(tmp_path / "b"), cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.startswith("Error: pack 'pack' module ")
    assert "needs operator dare 1.0 (from skillhub-dare), which is not installed: pip install skillhub-dare" in failed.stderr
    assert not (tmp_path / "b").exists()
