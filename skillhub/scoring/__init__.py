"""What every layer above feeds a model and measures with: prompt formats (chat template or plain,
answers joined as tokens, the end of an answer), eval sets, exact match and perplexity, lm-eval
tasks, ACC/BWT/FWT (``metrics``) and the interference of packs (``interference``). Layer 4."""

from skillhub.scoring.prompts import FORMATS, PromptFormat, Renderer, check_context, normalize_answer

__all__ = ["FORMATS", "PromptFormat", "Renderer", "check_context", "normalize_answer"]
