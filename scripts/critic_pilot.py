"""Pilot of the critic settings alone: critic RMSE vs the MC value (K = 32) of the initial student, no distillation.

    python scripts/critic_pilot.py TASK LR UPDATES HIDDEN GAMMA LAM     # e.g. fork 3e-3 1 64 1.0 0.95
"""
import sys, time, torch
torch.set_num_threads(1)
from opd.config.load import load_config, with_overrides
from opd.build import build_task, resolve_model_path
from opd.models import load_model, load_tokenizer
from opd.rollout import generate_rollouts
from opd.critic import Critic
from opd.value_mc import mc_state_values
from opd.math.value_targets import masked_rmse
task_name = sys.argv[1]; lr = float(sys.argv[2]); upd = int(sys.argv[3]); hidden = int(sys.argv[4]); gamma=float(sys.argv[5]); lam=float(sys.argv[6])
S = load_model(resolve_model_path(f"builtin:{task_name}/student")).eval(); tok = load_tokenizer(resolve_model_path(f"builtin:{task_name}/student"))
T = load_model(resolve_model_path(f"builtin:{task_name}/teacher")).eval()
from opd.config.schema import Config
cfg = with_overrides(Config(), [f"data.task={task_name}", f"student.model=builtin:{task_name}/student", f"teacher.model=builtin:{task_name}/teacher"])
task = build_task(cfg, eos_token=tok.eos_token)
maxnew = cfg.rollout.max_new_tokens
def batch(step):
    ex = task.train_examples(step, 64, 0)
    r = generate_rollouts(S, tok, ex, max_new_tokens=maxnew)
    with torch.no_grad():
        ids = torch.cat([r.prompt_ids_BP, r.completion_ids_BT], 1); m = torch.cat([r.prompt_mask_BP, r.completion_mask_BT.long()], 1)
        lt = torch.log_softmax(T(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(1)-1).clamp(min=0)).logits[:, r.prompt_ids_BP.shape[1]-1:-1].float(), -1)
        tl = lt.gather(-1, r.completion_ids_BT[..., None])[..., 0]
    rew = torch.where(r.completion_mask_BT, tl - r.behaviour_logprobs_BT, torch.zeros_like(tl))
    return r, rew
torch.manual_seed(123)
hr, _ = batch(999999)
vmc, se = mc_state_values(S, T, hr.prompt_ids_BP, hr.prompt_mask_BP, hr.completion_ids_BT, hr.completion_mask_BT, samples=32, gamma=gamma, max_new_tokens=maxnew, stop_ids=[tok.eos_token_id])
m = hr.completion_mask_BT
print("MC value mean", float(vmc[m].mean()), "std across states", float(vmc[m].std()), "mean stderr K=32", float(se[m].mean()))
c = Critic(len(tok) if len(tok) >= S.config.vocab_size else S.config.vocab_size, hidden=hidden, lr=lr, updates=upd, seed=0)
t0=time.time()
for i in range(400):
    r, rew = batch(10_000_000 + i)
    c.update(r.prompt_ids_BP, r.prompt_mask_BP, r.completion_ids_BT, r.completion_mask_BT, rew, gamma=gamma, lam=lam)
    if (i+1) in (25, 50, 100, 200, 400):
        v = c.values(hr.prompt_ids_BP, hr.prompt_mask_BP, hr.completion_ids_BT, m)
        print(i+1, "critic rmse vs MC", masked_rmse(v, vmc.float(), m), f"{time.time()-t0:.1f}s")
