"""Grafting on the demo's sizes: scores at each stage, wall time and memory of each stage.

The demo's grafting step, measured: a tiny GPT-2 source (its own tokenizer: every token id
differs from the target's) trained on `rot` (ROT13), grafted into the demo's Llama base, which
cannot do it. For each setting, the held-out exact match of: the target before, the source,
the target after SFT, after SFT+DPO, and the pack applied to the target (and the pack's share
of the SFT+DPO score, goal >= 95%). Settings: the demo's (8 SFT epochs; paper pairs, LN-DPO),
and an under-trained SFT (1 epoch) followed by each pair strategy, where DPO has room to help
or hurt.

Per stage of the demo setting: wall time on this machine's cores, and peak resident memory
above the process's resident memory before the graft (sampled every 10 ms). Side by side in
the same run: TRL's SFTTrainer against skillhub's bare torch loop (`demo.train.finetune`:
AdamW, the same steps and batch), as the ratio of their wall times.

    python bench/bench_graft.py [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillhub.activation import apply_packs
from skillhub.compress.options import CompressionOptions
from skillhub.demo.run import GRAFT_TASK as TASK, LEARNING_RATE, graft_settings, train_graft_source
from skillhub.demo.synthetic import build_tiny_model, split_examples, write_jsonl
from skillhub.demo.train import finetune
from skillhub.scoring.scores import exact_match
from skillhub.graft import TrainingSettings, graft
from skillhub.progress import quiet_transformers



class PeakMemory:
    """Peak resident set size per stage, sampled from /proc/self/status, above a baseline."""

    def __init__(self) -> None:
        self.stage, self.peaks, self.baseline = None, {}, self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/self/status")

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            if self.stage is not None:
                self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), self.rss() - self.baseline)

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage = "pack" if stage in ("compress", "calibrate") else stage

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def score(model_dir: Path, test: list[dict[str, str]]) -> float:
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return exact_match(model, AutoTokenizer.from_pretrained(model_dir), test)


def run_setting(root: Path, name: str, source: Path, target: Path, prompts: Path, test: list[dict[str, str]], *,
                sft_epochs: float, pairs: str, seed: int, memory: PeakMemory | None = None) -> dict:
    output = root / name
    result = graft(source, target, prompts, output, task=TASK, pairs=pairs, **graft_settings(sft_epochs=sft_epochs),
                   compression=CompressionOptions(seed=seed), keep=True,
                   progress=memory.progress if memory else lambda *_: None)
    work = result.work_dir
    sft = score(work / "sft", test)
    dpo = score(work / "dpo", test) if (work / "dpo").is_dir() else None
    applied = score(apply_packs(target, [output], root / f"{name}-applied"), test)
    tuned = dpo if dpo is not None else sft
    return {"setting": name, "sft": sft, "dpo": dpo, "pack": applied, "pack_share": applied / tuned if tuned else None,
            "pairs": result.pairs, "sft_examples": result.sft_examples, "seconds": result.seconds,
            "pack_bytes": result.pack.manifest.stored_bytes, "ratio": result.pack.manifest.ratio,
            "steps": {"sft": -(-result.sft_examples // 16) * sft_epochs}}


def trl_vs_bare_loop(root: Path, target: Path, prompts: list[dict[str, str]], steps: int) -> dict:
    from skillhub.graft.training import supervised_finetune

    examples = [{"prompt": p["prompt"], "completion": p["answer"]} for p in prompts]
    started = time.perf_counter()
    finetune(target, prompts, root / "bare", steps=steps, batch_size=16, learning_rate=LEARNING_RATE)
    bare = time.perf_counter() - started
    started = time.perf_counter()
    supervised_finetune(target, examples, root / "trl",
                        TrainingSettings(learning_rate=LEARNING_RATE, steps=steps, batch_size=16))
    trl = time.perf_counter() - started
    return {"steps": steps, "bare_seconds": round(bare, 2), "trl_seconds": round(trl, 2), "ratio": trl / bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="bench-graft-") as scratch:
        root = Path(scratch)
        train, test = split_examples(TASK, train=1000, test=200, seed=args.seed)
        copy_train, _ = split_examples("copy", train=2000, test=1, seed=args.seed)
        target = finetune(build_tiny_model(root / "init", seed=args.seed), copy_train, root / "target", steps=800,
                          learning_rate=3e-3, seed=args.seed)
        source = train_graft_source(root, train, seed=args.seed)
        prompts = write_jsonl(train, root / "prompts.jsonl")
        report = {"seed": args.seed, "target_before": score(target, test), "source": score(source, test),
                  "settings": []}
        with PeakMemory() as memory:
            demo = run_setting(root, "demo", source, target, prompts, test, sft_epochs=8, pairs="paper",
                               seed=args.seed, memory=memory)
        demo["peak_rss_mb"] = {stage: round(b / 2**20, 1) for stage, b in memory.peaks.items()}
        report["settings"].append(demo)
        for pairs in ("none", "paper", "source-vs-target"):
            report["settings"].append(run_setting(root, f"sft-1-epoch-{pairs}", source, target, prompts, test,
                                                  sft_epochs=1, pairs=pairs, seed=args.seed))
        report["trl_vs_bare_loop"] = trl_vs_bare_loop(root, target, train, steps=500)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"seed {args.seed}: target before {report['target_before']:.3f}, source {report['source']:.3f} "
          f"(exact match on 200 held-out prompts)")
    print("| setting | DPO pairs | after SFT | after SFT+DPO | pack applied | pack / tuned |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in report["settings"]:
        dpo = "-" if s["dpo"] is None else f"{s['dpo']:.3f}"
        print(f"| {s['setting']} | {s['pairs']} | {s['sft']:.3f} | {dpo} | {s['pack']:.3f} | {s['pack_share']:.1%} |")
    print(f"\nDemo setting, per stage (wall s / peak RSS above baseline, MB); pack {demo['pack_bytes']:,} bytes "
          f"({demo['ratio']:.2%} of the fp16 delta):")
    print("| stage | seconds | peak RSS MB |")
    print("|---|---:|---:|")
    for stage, seconds in demo["seconds"].items():
        print(f"| {stage} | {seconds:.2f} | {demo['peak_rss_mb'].get(stage, 0.0):.1f} |")
    side = report["trl_vs_bare_loop"]
    print(f"\nSFT, {side['steps']} steps of 16: TRL SFTTrainer {side['trl_seconds']} s, bare torch loop "
          f"{side['bare_seconds']} s: ratio {side['ratio']:.2f}")


if __name__ == "__main__":
    main()
