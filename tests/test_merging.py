"""Merges of several packs (PEFT's TIES/DARE/task arithmetic on decoded deltas), the in-place
Patcher, and the interference report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft.utils import merge_utils
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from skillhub.activation import Merge, Patcher, apply_packs, patched
from skillhub.cli import main
from skillhub.errors import SkillhubError
from skillhub.scoring.interference import interference
from skillhub.io.checkpoint import open_checkpoint
from skillhub.pack.format import load_pack

from conftest import FineTune


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "average"}, "unknown merge method"),
    ({"method": "ties", "density": 0.0}, "--density must be in (0, 1]"),
    ({"method": "ties", "density": 1.5}, "--density must be in (0, 1]"),
    ({"method": "ties", "scale": 0.0}, "--lambda must be in (0, 10]"),
    ({"method": "ties", "scale": float("nan")}, "--lambda must be in (0, 10]"),
    ({"method": "ties", "scale": 11.0}, "--lambda must be in (0, 10]"),
    ({"method": "ties", "weights": (1.0, float("inf"))}, "--weights must be finite"),
    ({"method": "ties", "weights": (0.0, 0.0)}, "all zero"),
])
def test_merge_parameters_out_of_range_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(SkillhubError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Merge(**kwargs)


def test_merge_combines_as_peft_does_and_dare_is_seeded_per_module() -> None:
    torch.manual_seed(1)
    deltas = [torch.randn(16, 8), torch.randn(16, 8), torch.zeros(16, 8)]
    weights = torch.tensor([1.0, 0.5, 1.0])
    ties = Merge("ties", weights=(1.0, 0.5, 1.0), density=0.3, scale=1.5).combine(deltas, "m")
    assert torch.equal(ties, 1.5 * merge_utils.ties(deltas, weights, 0.3))
    arithmetic = Merge("task-arithmetic", scale=0.4).combine(deltas, "m")
    assert torch.allclose(arithmetic, 0.4 * (deltas[0] + deltas[1]))
    # density 1 keeps every entry: TIES then only elects signs (one delta: the delta itself).
    assert torch.equal(Merge("ties", density=1.0).combine([deltas[0]], "m"), deltas[0])
    dare = Merge("dare-ties", density=0.5, seed=3)
    state = torch.random.get_rng_state()
    first = dare.combine(deltas, "layer.0")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
    assert torch.equal(first, dare.combine(deltas, "layer.0"))  # reproducible
    assert not torch.equal(first, dare.combine(deltas, "layer.1"))  # each module draws its own mask
    assert not torch.equal(first, Merge("dare-ties", density=0.5, seed=4).combine(deltas, "layer.0"))
    kept = (Merge("dare-linear", density=0.5).combine([deltas[0]], "m") != 0).float().mean()
    assert 0.3 < float(kept) < 0.7


def test_apply_with_a_merge_writes_base_plus_the_merged_deltas(finetuned: FineTune, three_packs, tmp_path: Path) -> None:
    packs = [load_pack(three_packs[t]) for t in ("shift", "reverse")]
    merge = Merge("ties", weights=(1.0, 0.7), density=0.4)
    out = apply_packs(finetuned.base, packs, tmp_path / "merged", merge=merge)
    base = open_checkpoint(finetuned.base)
    name = "model.layers.1.mlp.up_proj.weight"
    expected = base.read(name).float() + 1.0 * merge_utils.ties(
        [p.decode(name) for p in packs], torch.tensor([1.0, 0.7]), 0.4)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(name), expected.to(base.dtype(name)))
        assert json.loads(f.metadata()["skillhub_merge"])["method"] == "ties"
    AutoModelForCausalLM.from_pretrained(out)  # a loadable checkpoint
    with pytest.raises(SkillhubError, match="gives 1 weight"):
        apply_packs(finetuned.base, packs, tmp_path / "bad", merge=Merge("ties", weights=(1.0,)))
    assert not (tmp_path / "bad").exists()


def test_patcher_switches_sets_exactly_and_lends_the_base_back(finetuned: FineTune, three_packs) -> None:
    model = AutoModelForCausalLM.from_pretrained(finetuned.base, dtype=torch.float32)
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    shift, reverse = load_pack(three_packs["shift"]), load_pack(three_packs["reverse"])
    with patched(model, [shift]):
        only_shift = {n: p.detach().clone() for n, p in model.named_parameters()}
    patcher = Patcher(model, cache_sets=2)
    patcher.use([reverse])
    patcher.use([shift])
    assert all(torch.equal(p, only_shift[n]) for n, p in model.named_parameters())
    with patcher.base_weights():
        assert all(torch.equal(p, pristine[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, only_shift[n]) for n, p in model.named_parameters())
    patcher.use([shift, reverse], Merge("dare-linear", density=0.5))
    patcher.restore()
    assert all(torch.equal(p, pristine[n]) for n, p in model.named_parameters())


def test_patcher_keeps_at_most_cache_sets_sets_and_counts_switches(finetuned: FineTune, three_packs) -> None:
    model = AutoModelForCausalLM.from_pretrained(finetuned.base, dtype=torch.float32)
    packs = [load_pack(three_packs[t]) for t in ("shift", "reverse", "sort")]
    expected = []
    for pack in packs:
        with patched(model, [pack]):
            expected.append({n: p.detach().clone() for n, p in model.named_parameters()})
    patcher = Patcher(model, cache_sets=1)
    for index in (0, 1, 0, 2, 2):
        patcher.use([packs[index]])
        assert all(torch.equal(p, expected[index][n]) for n, p in model.named_parameters())
        assert len(patcher._cache) == 1  # never two sets beside the base
    assert (patcher.switches, patcher.cache_hits) == (4, 0)  # the last use was already current
    patcher = Patcher(model, cache_sets=2)
    for index in (0, 1, 0, 1):
        patcher.use([packs[index]])
    assert (patcher.switches, patcher.cache_hits) == (4, 2)
    patcher.restore()


def test_interference_of_a_pack_with_itself_and_with_others(three_packs) -> None:
    shift = load_pack(three_packs["shift"])
    same = interference([shift, shift], labels=["a", "b"])
    assert same.pairs[0].overall.cosine == pytest.approx(1.0, abs=1e-5)
    assert same.pairs[0].overall.sign_conflict == 0.0 and same.pairs[0].overall.overlap == pytest.approx(1.0, abs=1e-4)
    assert same.verdict == "aligned"
    report = interference([shift, load_pack(three_packs["reverse"]), load_pack(three_packs["sort"])])
    assert len(report.pairs) == 3 and report.verdict in ("conflicting", "aligned", "independent")
    for pair in report.pairs:
        m = pair.overall
        assert -1 <= m.cosine < 0.99 and 0 <= m.sign_conflict <= 1 and m.norm_ratio >= 1
        assert m.chance < m.overlap <= 1  # fine-tunes of one base share input directions beyond chance
        assert {"attention", "mlp"} <= set(pair.by_role)


def test_interference_and_merge_on_the_command_line(three_packs, finetuned: FineTune, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["interference", str(three_packs["shift"]), str(three_packs["sort"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] in ("conflicting", "aligned", "independent") and len(report["pairs"]) == 1
    out = tmp_path / "out"
    result = runner.invoke(main, ["apply", str(finetuned.base), str(three_packs["shift"]), str(three_packs["sort"]),
                                  "-o", str(out), "--merge", "dare-ties", "--density", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    for args, message in [(["--merge", "ties", "--density", "2"], "--density must be in (0, 1]"),
                          (["--merge", "ties", "--lambda", "-1"], "--lambda must be in (0, 10]"),
                          (["--merge", "sum", "--lambda", "2"], "not sum"),
                          (["--merge", "ties", "--weights", "1,x"], "comma-separated numbers"),
                          (["--merge", "ties", "--weights", "1"], "gives 1 weight(s) for 2 pack(s)"),
                          (["--merge", "median"], "unknown merge method")]:
        bad = tmp_path / "bad"
        result = runner.invoke(main, ["apply", str(finetuned.base), str(three_packs["shift"]), str(three_packs["sort"]),
                                      "-o", str(bad), *args])
        assert result.exit_code == 1 and result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not bad.exists()
