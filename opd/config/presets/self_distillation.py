"""Self-distillation: the teacher is the student itself shown a privileged context (a solution, a
demonstration, feedback) — frozen at its initial weights or live."""

from __future__ import annotations

from opd.config.presets.base import SELF_TEACHER, Preset, route1_values, route2_values, sampled_token

PRESETS: tuple[Preset, ...] = (
    Preset(
        name="opsd",
        summary="On-policy self-distillation: the frozen initial student, shown the example's privileged "
                "context (e.g. the solution), is the teacher; full-vocabulary reverse KL to it on the "
                "student's own samples.",
        citation="Zhao et al., 'Self-Distilled Reasoner: On-Policy Self-Distillation for Large Language Models' "
                 "(OPSD), arXiv 2601.18734 (code siyan-zhao/OPSD)",
        formula="L = mean_t KL(π_S(·|x, y_<t) ‖ sg π_S0(·|c, x, y_<t)),  c = privileged context",
        notes="The full-vocabulary reverse-KL default is [MEMORY]; the paper's generalized-JSD variant: "
              "route1.divergence=jsd. The built-in arith task supplies a teacher-only hint; for your data set "
              "data.context_field.",
        values=route1_values({"divergence": "rkl", "coef": 1.0}, teacher=SELF_TEACHER),
    ),
    Preset(
        name="sdft",
        summary="SDFT: the frozen base student shown an expert demonstration in context is the teacher; the "
                "sampled-token log-ratio to it is the advantage of tinker's importance-sampling loss, on the "
                "student's own samples (new skills with less forgetting than SFT).",
        citation="Shenfeld et al., 'Self-Distillation Enables Continual Learning' (SDFT), arXiv 2601.19897; "
                 "tinker-cookbook distillation/sdft.py",
        formula="A_t = log π_S0(y_t|c, x, y_<t) − log μ(y_t|x, y_<t);  L = −Σ_{b,t} (π_S(y_t)/μ(y_t)) · A_t,  "
                "c = demonstration",
        notes="Follows the tinker-cookbook recipe (static base weights as teacher, importance-sampling loss "
              "summed, reward from the sampler's log-probs); its lr 2e-5 and LoRA rank 128 are task-specific "
              "and left to the run. The demonstration comes from data.context_field (the arith task's hint).",
        values=route2_values(sampled_token(reward_logprobs="behaviour"), teacher=SELF_TEACHER,
                             gates={"reduction": "sum"}),
    ),
    Preset(
        name="sdpo",
        summary="SDPO: the live student conditioned on feedback (errors, a judge's text, a successful sibling) "
                "is the teacher; full-vocabulary reverse KL to it (stop-gradient) on the student's own samples.",
        citation="Hübotter et al., 'Reinforcement Learning via Self-Distillation' (SDPO), arXiv 2601.20802 (code "
                 "lasgroup/SDPO)",
        formula="L = mean_t KL(π_θ(·|x, y_<t) ‖ sg π_θ(·|x, f, y_<t)),  f = feedback in context",
        notes="The paper uses a top-K approximation for memory (support.kind=teacher_topk support.norm=tail "
              "teacher.access=topk) and can mix in GRPO (outcome.adv_tau with route 2); the full vocabulary "
              "here is exact. The feedback comes from data.context_field (the arith task's hint stands in).",
        values=route1_values({"divergence": "rkl", "coef": 1.0}, teacher={**SELF_TEACHER, "self_mode": "live"}),
    ),
)
