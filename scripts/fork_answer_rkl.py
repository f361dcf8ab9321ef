"""Answer RKL (Σ_t KL(π_S‖π_T) along greedy states) of the initial fork student, and of the same student forced
onto path `a` (first token a: cost −log π_T(a|s_0); then its own greedy continuation)."""
import torch
torch.set_num_threads(1)
from opd.config.load import with_overrides
from opd.config.schema import Config
from opd.build import build_task, resolve_model_path
from opd.models import load_model, load_tokenizer
from opd.tasks.base import Example
from opd.rollout import generate_rollouts
S = load_model(resolve_model_path("builtin:fork/student")).eval(); tok = load_tokenizer(resolve_model_path("builtin:fork/student"))
T = load_model(resolve_model_path("builtin:fork/teacher")).eval()
cfg = with_overrides(Config(), ["data.task=fork", "student.model=builtin:fork/student", "teacher.model=builtin:fork/teacher", "data.eval_seed=0"])
task = build_task(cfg, eos_token=tok.eos_token)
ex = task.eval_examples(500)
def answer_rkl(examples, first=None):
    exs = examples if first is None else [Example(prompt=e.prompt + first, answer=e.answer, fields=e.fields) for e in examples]
    r = generate_rollouts(S, tok, exs, max_new_tokens=8 - (first is not None), greedy=True)
    with torch.no_grad():
        ids = torch.cat([r.prompt_ids_BP, r.completion_ids_BT], 1); m = torch.cat([r.prompt_mask_BP, r.completion_mask_BT.long()], 1)
        pos = (m.cumsum(1) - 1).clamp(min=0); P = r.prompt_ids_BP.shape[1]
        ls = torch.log_softmax(S(input_ids=ids, attention_mask=m, position_ids=pos).logits[:, P-1:-1].double(), -1)
        lt = torch.log_softmax(T(input_ids=ids, attention_mask=m, position_ids=pos).logits[:, P-1:-1].double(), -1)
        kl = ((ls.exp() * (ls - lt)).sum(-1) * r.completion_mask_BT).sum(1)
        extra = 0.0
        if first is not None:  # the forced first token: KL of a point mass on it = −log π_T(first | s_0)
            ids0 = r.prompt_ids_BP[:, :-1]; m0 = r.prompt_mask_BP[:, :-1]
            lt0 = torch.log_softmax(T(input_ids=ids0, attention_mask=m0, position_ids=(m0.cumsum(1)-1).clamp(min=0)).logits[:, -1].double(), -1)
            extra = -lt0[:, r.prompt_ids_BP[0, -1]]
        texts = tok.batch_decode(r.completion_ids_BT, skip_special_tokens=False)
        acc = sum(task.verify(e, (first or "") + t) for e, t in zip(examples, texts)) / len(examples)
    return float((kl + extra).mean()), float(extra.mean()) if first else 0.0, acc
print("student as is: answer RKL %.2f (first-token part %.2f), greedy accuracy %.3f" % answer_rkl(ex))
print("forced onto a: answer RKL %.2f (first-token part %.2f), greedy accuracy %.3f" % answer_rkl(ex, "a"))
print("forced onto b: answer RKL %.2f (first-token part %.2f), greedy accuracy %.3f" % answer_rkl(ex, "b"))
