"""Knowledge grafting (paper §3.2): a source model of any architecture answers prompts, a scorer
ranks the answers, the target is fully fine-tuned on them (SFT, then DPO, on TRL), and the
delta is compressed into a SkillPack. See :mod:`skillhub.graft.pipeline` for the stages."""

from skillhub.graft.generation import GenerationSettings
from skillhub.graft.pipeline import STAGES, GraftResult, graft
from skillhub.graft.scorers import Scorer, load_scorer, scorer_names
from skillhub.graft.training import TrainingSettings

__all__ = ["STAGES", "GenerationSettings", "GraftResult", "Scorer", "TrainingSettings", "graft", "load_scorer",
           "scorer_names"]
