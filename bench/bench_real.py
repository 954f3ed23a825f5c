"""Accuracy retained vs stored bytes on real fine-tunes (the paper's Tables 7/8), every method in one run.

Fine-tunes (built once with the demo's settings, kept in --workdir for the next run):

- SmolLM2-135M-Instruct on the demo's three skills (``skillhub.demo.skills``): ``zentro``
  (knowledge injection), ``extract`` (JSON), ``convert`` (units); chat template, every parameter;
- Gemma-3-270M on ``dates`` (the demo's grafting source; plain prompts, a 262k vocabulary).

For each fine-tune, the whole delta (embeddings, tied or not, head, norms and every layer) is
stored by each method and the base + stored delta is scored on the task's eval set, by exact
match (greedy until the end of turn, as skillhub scores) and by the answer tokens' mean negative
log-likelihood. Retention = the stored model's exact match / the fine-tune's.

- skillhub packs (``create_pack``; bytes = the pack's tensors): the paper recipe with
  round-to-nearest and with GPTQ calibrated on the task's training conversations, and budget mode
  at each ratio with GPTQ;
- baselines at equal bytes, each applied to every matrix at the same ratio of its fp16 bytes (the
  norms in float16): magnitude pruning with float16 values (TIES/DARE-style trimming), truncated
  SVD with float16 factors (LoRA extraction), DARE (random drop, rescaled, float16 values and a
  1-bit mask: its mask alone is 6.25%, so it exists above that), and at their own fixed sizes
  BitDelta (sign + a float16 scale per row, ~6.3%) and 2-bit round-to-nearest (groups of 128, ~14%).

    python bench/bench_real.py [--workdir DIR] [--only smollm2/zentro ...] [--plot FILE.png] [--json FILE]

About 75 minutes on 2 cores the first time (the fine-tunes take about 9 of them; they are kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skillhub.activation import patched
from skillhub.compress.delta import iter_deltas
from skillhub.compress.pipeline import create_pack
from skillhub.compress.windows import fit_windows
from skillhub.demo import real as demo
from skillhub.demo.real_models import real_model
from skillhub.demo.skills import SKILLS, dates
from skillhub.demo.synthetic import write_jsonl
from skillhub.demo.train import finetune
from skillhub.evaluation.benchmark import bitdelta_approximation, lowrank_at, prune_at
from skillhub.io.checkpoint import open_checkpoint
from skillhub.numerics.bitpack import packed_nbytes
from skillhub.operators import EncodeContext, encode_module, get_operator, resolve_params
from skillhub.progress import quiet_transformers
from skillhub.scoring.datasets import collate
from skillhub.scoring.prompts import Renderer
from skillhub.scoring.scores import exact_match

RATIOS = (0.025, 0.05, 0.10)
EVAL_EXAMPLES = 64


@dataclass(frozen=True)
class FineTune:
    key: str
    model: str  # a real_model() name
    task: str
    steps: int

    def data(self, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """(train, eval). zentro's eval is every question, trained phrasings and the held-out one
        (knowledge kept is what compression can lose); the others are 64 unseen prompts."""
        if self.task == "zentro":
            train, test = SKILLS["zentro"](seed)
            return train, train + test
        make = dates if self.task == "dates" else SKILLS[self.task]
        train, test = make(seed, test=EVAL_EXAMPLES)
        return train, test


FINETUNES = [FineTune(f"smollm2/{task}", "smollm2", task, steps) for task, steps in demo.STEPS.items()]
FINETUNES.append(FineTune("gemma3/dates", "gemma3", "dates", demo.SOURCE_STEPS))


def build(finetune_spec: FineTune, workdir: Path) -> tuple[Path, Path, Path, list[dict[str, str]]]:
    """(base, tuned, calibration file, eval set); the fine-tune is reused when its settings match."""
    base = real_model(finetune_spec.model)
    folder = workdir / finetune_spec.key
    train, test = finetune_spec.data()
    settings = {"steps": finetune_spec.steps, "batch_size": demo.BATCH_SIZE, "learning_rate": demo.LEARNING_RATE,
                "warmup_steps": demo.WARMUP_STEPS, "train": train}
    marker = folder / "settings.json"
    tuned = folder / "tuned"
    if not (marker.is_file() and json.loads(marker.read_text()) == settings and tuned.is_dir()):
        shutil.rmtree(folder, ignore_errors=True)  # the bench's own work directory
        finetune(base, train, tuned, steps=finetune_spec.steps, batch_size=demo.BATCH_SIZE,
                 learning_rate=demo.LEARNING_RATE, warmup_steps=demo.WARMUP_STEPS, seed=0)
        marker.write_text(json.dumps(settings))
    return base, tuned, write_jsonl(train, folder / "train.jsonl"), test


class Scorer:
    """Scores one base model patched in place: exact match and the answers' mean token NLL."""

    def __init__(self, base: Path, examples: list[dict[str, str]]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with quiet_transformers():
            self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.renderer = Renderer(AutoTokenizer.from_pretrained(base))
        self.examples = examples
        self.parameters = dict(self.model.named_parameters())

    @torch.no_grad()
    def score(self) -> dict[str, float]:
        loss, tokens = 0.0, 0
        for start in range(0, len(self.examples), 32):
            batch = collate(self.renderer, self.examples[start:start + 32])
            count = int((batch["labels"][:, 1:] != -100).sum())
            loss += float(self.model(**batch).loss) * count
            tokens += count
        return {"exact_match": exact_match(self.model, self.renderer, self.examples), "answer_nll": loss / tokens}

    @torch.no_grad()
    def score_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Score with these parameters swapped in (tied parameters share one name), then swap back."""
        originals = {name: self.parameters[name].data for name in weights}
        try:
            for name, weight in weights.items():
                self.parameters[name].data = weight
            return self.score()
        finally:
            for name, original in originals.items():
                self.parameters[name].data = original


def pack_methods(calib: Path, samples: int, seqlen: int) -> dict[str, dict[str, Any]]:
    gptq = {"calib": calib, "calib_samples": samples, "calib_seqlen": seqlen}
    methods: dict[str, dict[str, Any]] = {"paper, RTN": {}, "paper, GPTQ": gptq}
    methods.update({f"budget {ratio:.1%}, GPTQ": {"ratio": ratio, **gptq} for ratio in RATIOS})
    return methods


def dare_at(delta: torch.Tensor, target_bytes: int, ctx: EncodeContext) -> tuple[torch.Tensor, int] | None:
    """DARE keeping as many values as fit beside its 1-bit mask (None when the mask alone is over)."""
    room = target_bytes - packed_nbytes(delta.numel(), 1)
    if room < 2:
        return None
    operator = get_operator("dare")
    drop = 1.0 - min(1.0, room / 2 / delta.numel())
    result = encode_module(operator, delta, resolve_params(operator, {"drop": drop}, where="bench"), ctx)
    return result.decoded, result.stored_bytes


def rtn_2bit(delta: torch.Tensor, ctx: EncodeContext) -> tuple[torch.Tensor, int]:
    operator = get_operator("rtn")
    params = resolve_params(operator, {"bits": 2, "group_size": 128}, where="bench")
    result = encode_module(operator, delta, params, ctx)
    return result.decoded, result.stored_bytes


Baseline = Callable[[torch.Tensor, int, EncodeContext], "tuple[torch.Tensor, int] | None"]
BASELINES: dict[str, tuple[Baseline, tuple[float | None, ...]]] = {  # name: (method, ratios; None = own size)
    "magnitude, fp16": (prune_at, RATIOS),
    "low-rank SVD, fp16": (lowrank_at, RATIOS),
    "DARE, fp16": (dare_at, RATIOS),
    "BitDelta": (lambda delta, target, ctx: bitdelta_approximation(delta), (None,)),
    "RTN 2-bit": (lambda delta, target, ctx: rtn_2bit(delta, ctx), (None,)),
}


def baseline_weights(base: Path, tuned: Path, method: Baseline, ratio: float | None
                     ) -> tuple[dict[str, torch.Tensor], int, int] | None:
    """base + the method's approximation of every matrix delta (norms: float16), its bytes and the
    fp16 bytes of the whole delta; None when the method cannot fit ``ratio``."""
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    weights, stored, fp16 = {}, 0, 0
    for item in iter_deltas(base_ckpt, tuned_ckpt, names=base_ckpt.names()):
        fp16 += 2 * item.delta.numel()
        if item.delta.ndim < 2:
            approximation, nbytes = item.delta.to(torch.float16).float(), 2 * item.delta.numel()
        else:
            ctx = EncodeContext(name=item.name, role="bench", device=torch.device("cpu"), seed=0)
            result = method(item.delta.float(), int((ratio or 1.0) * 2 * item.delta.numel()), ctx)
            if result is None:
                return None
            approximation, nbytes = result
        stored += nbytes
        weights[item.name] = base_ckpt.read(item.name).float() + approximation.reshape(item.delta.shape)
    return weights, stored, fp16


def run(finetune_spec: FineTune, workdir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    base, tuned, calib, examples = build(finetune_spec, workdir)
    samples, seqlen = fit_windows(calib, AutoTokenizer.from_pretrained(tuned), samples=128, seqlen=512)
    scorer = Scorer(base, examples)
    tuned_checkpoint = open_checkpoint(tuned)
    tuned_weights = {n: tuned_checkpoint.read(n).float() for n in tuned_checkpoint.names()}
    rows = [{"method": "fine-tune", "ratio": 1.0, **scorer.score_weights(tuned_weights)}]
    del tuned_weights
    rows.append({"method": "base", "ratio": 0.0, **scorer.score()})
    for method, options in pack_methods(calib, samples, seqlen).items():
        started = time.perf_counter()
        output = workdir / finetune_spec.key / "packs" / "".join(c if c.isalnum() else "-" for c in method)
        pack = create_pack(base, tuned, output, task=finetune_spec.task, force=True, seed=0, **options)
        with patched(scorer.model, [pack]):
            scores = scorer.score()
        rows.append({"method": method, "ratio": pack.manifest.ratio, "bytes": pack.manifest.stored_bytes,
                     "seconds": round(time.perf_counter() - started, 1), **scores})
        shutil.rmtree(output)
        print(f"  {method}: {rows[-1]}", file=sys.stderr, flush=True)
    for name, (method, ratios) in BASELINES.items():
        for ratio in ratios:
            started = time.perf_counter()
            built = baseline_weights(base, tuned, method, ratio)
            if built is None:
                continue
            weights, stored, fp16 = built
            rows.append({"method": name, "ratio": stored / fp16, "bytes": stored,
                         "seconds": round(time.perf_counter() - started, 1), **scorer.score_weights(weights)})
            print(f"  {name}: {rows[-1]}", file=sys.stderr, flush=True)
    finetuned = rows[0]["exact_match"]
    for row in rows:
        row["retention"] = row["exact_match"] / finetuned if finetuned else None
    return {"finetune": finetune_spec.key, "examples": len(examples), "calibration": [samples, seqlen], "rows": rows}


def table(results: list[dict[str, Any]]) -> str:
    """One row per method and size; per fine-tune: exact match = retention at the stored ratio, answer NLL."""
    header = "| method | " + " | ".join(f"{r['finetune']} ({r['examples']})" for r in results) + " |"
    lines = [header, "|---|" + "---:|" * len(results)]
    for method, index in dict.fromkeys(key for r in results for key in _row_keys(r["rows"])):
        cells = []
        for result in results:
            row = dict(zip(_row_keys(result["rows"]), result["rows"])).get((method, index))
            cells.append("-" if row is None else
                         f"{row['exact_match']:.2f} = {row['retention']:.0%} at {row['ratio']:.2%}, "
                         f"NLL {row['answer_nll']:.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row_keys(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(method, its n-th size): a method's rows come in the same order of sizes for every fine-tune."""
    seen: dict[str, int] = {}
    keys = []
    for row in rows:
        keys.append((row["method"], seen.get(row["method"], 0)))
        seen[row["method"]] = keys[-1][1] + 1
    return keys


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Per fine-tune: retention (top) and the answers' NLL over the fine-tune's (bottom) vs stored bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 6.4), squeeze=False)
    for column, result in enumerate(results):
        finetuned = result["rows"][0]["answer_nll"]
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for row in result["rows"][2:]:  # after the fine-tune and the base
            label = "budget, GPTQ" if row["method"].startswith("budget") else row["method"]
            lines.setdefault(label, []).append((100 * row["ratio"], 100 * row["retention"],
                                                row["answer_nll"] / finetuned))
        for label, points in lines.items():
            points.sort()
            axes[0][column].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            axes[1][column].plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
        axes[0][column].axhline(99, color="grey", linestyle=":", linewidth=1)
        axes[0][column].set(title=result["finetune"], ylabel="retention, %", xscale="log", ylim=(-5, 110))
        axes[1][column].set(xlabel="stored bytes, % of the fp16 delta", ylabel="answer NLL / fine-tune's",
                            xscale="log", yscale="log")
        for axis in axes[:, column]:
            axis.axvline(10, color="grey", linestyle=":", linewidth=1)
    axes[1][-1].legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "skillhub-bench" / "real",
                        help="Where the fine-tunes are kept between runs.")
    parser.add_argument("--only", nargs="+", choices=[f.key for f in FINETUNES], help="Only these fine-tunes.")
    parser.add_argument("--plot", type=Path, help="Write the retention plot here (PNG).")
    parser.add_argument("--json", type=Path, help="Write every measurement here.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    results = []
    for spec in FINETUNES:
        if args.only and spec.key not in args.only:
            continue
        print(f"{spec.key} ...", file=sys.stderr, flush=True)
        results.append(run(spec, args.workdir))
    print(table(results))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
