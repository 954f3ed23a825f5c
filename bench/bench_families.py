"""Model-family choices of the paper recipe, measured side by side in one run (issue 15).

1. Experts saved as one 3-D tensor (GPT-OSS layout, 8 experts of 512 x 1024): the same fine-tune
   delta encoded by svd-mixed as one E x (a*b) matrix (before) and expert by expert (now).
2. A fused q/k/v projection at Phi-3-mini's real width (3 x 3072 x 3072), the delta of three
   independent matrices with slowly decaying spectra: one SVD for the fused matrix (before) and
   one per part (the paper recipe now).
3. Tied embeddings at real vocabulary sizes (Qwen3 151,936, Phi-4-mini 200,064, Falcon 65,024
   tokens; hidden 256, 2 layers, tied head): a full fine-tune of a few steps, then packs that differ
   only in how the shared embedding/head matrix is stored. Reported: the relative logit error of
   base + pack against the fine-tune (||logits - tuned|| / ||tuned - base|| on held-out text) and the
   pack's size against the fp16 delta.

    python bench/bench_families.py [--skip-tied]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from skillhub import apply_packs, create_pack
from skillhub.compress.recipe import PAPER_RECIPE
from skillhub.operators import EncodeContext, Split, encode_module, get_operator, resolve_params
from skillhub.progress import quiet_transformers


def _paper_params(role: str) -> dict:
    return next(rule["params"] for rule in PAPER_RECIPE["rules"] if rule["match"]["role"] == role)


TIED = {"qwen3-style": ("qwen3", 151_936), "phi-4-mini-style": ("phi3", 200_064), "falcon-style": ("llama", 65_024)}
# How the tied embedding/head matrix is stored: the paper's pruning, and the alternatives.
EMBEDDING_RULES = {
    "prune keep 0.5 @4 bits (paper before)": {"operator": "magnitude-prune", "params": {"keep": 0.5, "bits": 4}},
    "prune keep 0.5 @8 bits": {"operator": "magnitude-prune", "params": {"keep": 0.5, "bits": 8}},
    "prune keep 0.9 @4 bits": {"operator": "magnitude-prune", "params": {"keep": 0.9, "bits": 4}},
    "svd-mixed, MLP ranks (paper now)": {"operator": "svd-mixed", "params": _paper_params("mlp")},
    "rtn 4 bits": {"operator": "rtn", "params": {"bits": 4}},
    "rtn 8 bits": {"operator": "rtn", "params": {"bits": 8}},
    "raw float16": {"operator": "raw", "params": {"dtype": "float16"}},
}


def _recipe(rule: dict) -> dict:
    """The paper recipe with ``rule`` for the embedding and head, tied or not."""
    recipe = copy.deepcopy(PAPER_RECIPE)
    recipe["name"] = "embedding-" + rule["operator"]
    others = [r for r in recipe["rules"] if r["match"]["role"] != ["embedding", "head"]]
    recipe["rules"] = [{"match": {"role": ["embedding", "head"]}, **rule}, *others]
    return recipe


def _tied_finetune(root: Path, model_type: str, vocab: int) -> tuple[Path, Path, torch.Tensor]:
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / "base")
    # The "task": text over a few thousand tokens, as a fine-tune's data would be.
    tokens = torch.randint(3, vocab, (4096,), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    for step in range(30):
        ids = tokens[torch.randint(0, 4096, (8, 64), generator=torch.Generator().manual_seed(100 + step))]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with quiet_transformers():
        model.save_pretrained(root / "tuned")
    heldout = tokens[torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(7))]
    return root / "base", root / "tuned", heldout


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def tied_embeddings() -> None:
    print("## 3. Tied embeddings: relative logit error of base + pack, and pack size / fp16 delta\n")
    print("| model | vocab | " + " | ".join(EMBEDDING_RULES) + " |")
    print("|---|---:|" + "---:|" * len(EMBEDDING_RULES))
    for label, (model_type, vocab) in TIED.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            base, tuned, ids = _tied_finetune(root, model_type, vocab)
            before, after = _logits(base, ids), _logits(tuned, ids)
            cells = []
            for index, rule in enumerate(EMBEDDING_RULES.values()):
                pack = create_pack(base, tuned, root / f"pack{index}", task="t", recipe=_recipe(rule))
                got = _logits(apply_packs(base, [pack], root / f"applied{index}"), ids)
                error = float((got - after).norm() / (after - before).norm())
                cells.append(f"{error:.3f} / {pack.manifest['totals']['ratio']:.1%}")
            print(f"| {label} | {vocab:,} | " + " | ".join(cells) + " |", flush=True)
    print()


def _svd_mixed(delta: torch.Tensor, split: Split | None, name: str) -> tuple[float, float]:
    operator = get_operator("svd-mixed")
    params = resolve_params(operator, _paper_params("mlp"), where="bench")
    result = encode_module(operator, delta, params, EncodeContext(name=name, role="mlp"), split=split)
    return result.relative_error, result.stored_bytes / (2 * delta.numel())


def stacked_experts() -> None:
    print("## 1. Experts saved as one 3-D tensor (8 x 512 x 1024): svd-mixed, paper MLP ranks\n")
    with tempfile.TemporaryDirectory() as tmp:
        config = AutoConfig.for_model("gpt_oss", vocab_size=256, hidden_size=512, intermediate_size=512,
                                      num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                      num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention"],
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        with quiet_transformers():
            model = AutoModelForCausalLM.from_config(config)
        before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
        for step in range(30):
            ids = torch.randint(3, 256, (8, 64), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        delta = model.model.layers[0].mlp.experts.gate_up_proj.detach() - before
        del tmp
    print("| storage | relative error | stored / fp16 delta |")
    print("|---|---:|---:|")
    for label, split in (("one matrix, experts x (a*b) (before)", None), ("expert by expert (now)", Split.experts(8))):
        error, ratio = _svd_mixed(delta, split, "experts.gate_up_proj")
        print(f"| {label} | {error:.3f} | {ratio:.3f} |")
    print()


def fused_qkv(width: int = 3072) -> None:
    print(f"## 2. Fused q/k/v at Phi-3-mini width ({3 * width} x {width}), svd-mixed, paper attention ranks\n")
    generator = torch.Generator().manual_seed(0)
    parts = []
    for _ in range(3):  # independent deltas, singular values decaying as 1/sqrt(i)
        u, _ = torch.linalg.qr(torch.randn(width, width, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(width, width, generator=generator))
        parts.append((u * torch.arange(1, width + 1).pow(-0.5)) @ v.T)
    delta = torch.cat(parts) * 1e-3
    operator = get_operator("svd-mixed")
    params = resolve_params(operator, _paper_params("attention"), where="bench")
    print("| storage | relative error | stored / fp16 delta | ranks |")
    print("|---|---:|---:|---|")

    def row(label: str, split: Split | None, reference_dim: int = 4096) -> float:
        result = encode_module(operator, delta, {**params, "reference_dim": reference_dim},
                               EncodeContext(name="qkv_proj", role="attention"), split=split)
        metas = result.encoded.meta.get("parts", [result.encoded.meta])
        ratio = result.stored_bytes / (2 * delta.numel())
        print(f"| {label} | {result.relative_error:.3f} | {ratio:.3f} | {'/'.join(str(m['rank']) for m in metas)} |",
              flush=True)
        return ratio

    whole_ratio = row("one matrix (before)", None)
    split_ratio = row("q, k, v each (now)", Split(axis=0, sizes=(width,) * 3))
    # The fused matrix given as many bytes as the three parts take: its ranks scaled up to match.
    row("one matrix, same bytes as q, k, v each", None, reference_dim=round(4096 * whole_ratio / split_ratio))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tied", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    stacked_experts()
    fused_qkv()
    if not args.skip_tied:
        tied_embeddings()


if __name__ == "__main__":
    main()
