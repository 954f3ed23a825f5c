"""What every layer above feeds a model: prompt formats (chat template or plain, answers joined as
tokens, the end of an answer), eval sets, exact match and perplexity, and lm-eval tasks."""

from skillhub.scoring.prompts import FORMATS, PromptFormat, Renderer, check_context, normalize_answer

__all__ = ["FORMATS", "PromptFormat", "Renderer", "check_context", "normalize_answer"]
