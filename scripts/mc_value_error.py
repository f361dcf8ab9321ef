"""K = 4 Monte-Carlo values against K = 512 on the states of 8 rollouts of the initial student (fork / modes)."""
import sys, torch
torch.set_num_threads(1)
from opd.build import build_task, resolve_model_path
from opd.config.load import with_overrides
from opd.config.schema import Config
from opd.models import load_model, load_tokenizer
from opd.rollout import generate_rollouts
from opd.value_mc import mc_state_values
name = sys.argv[1]
S = load_model(resolve_model_path(f"builtin:{name}/student")).eval(); tok = load_tokenizer(resolve_model_path(f"builtin:{name}/student"))
T = load_model(resolve_model_path(f"builtin:{name}/teacher")).eval()
cfg = with_overrides(Config(), [f"data.task={name}", f"student.model=builtin:{name}/student", f"teacher.model=builtin:{name}/teacher"])
task = build_task(cfg, eos_token=tok.eos_token)
torch.manual_seed(0)
r = generate_rollouts(S, tok, task.train_examples(0, 8, 0), max_new_tokens=cfg.rollout.max_new_tokens)
m = r.completion_mask_BT
args = (S, T, r.prompt_ids_BP, r.prompt_mask_BP, r.completion_ids_BT, m)
for gamma in (1.0, 0.9):
    ref, ref_se = mc_state_values(*args, samples=512, gamma=gamma, max_new_tokens=cfg.rollout.max_new_tokens, stop_ids=[tok.eos_token_id])
    errs, ses = [], []
    for rep in range(20):
        v, se = mc_state_values(*args, samples=4, gamma=gamma, max_new_tokens=cfg.rollout.max_new_tokens, stop_ids=[tok.eos_token_id])
        errs.append((v - ref)[m]); ses.append(se[m])
    e = torch.cat(errs); s = torch.cat(ses)
    print(f"{name} γ={gamma}: {int(m.sum())} states, |V| mean {float(ref[m].abs().mean()):.2f}; K=4 error vs K=512: rmse {float(e.pow(2).mean().sqrt()):.3f}, mean {float(e.mean()):+.3f}; mean reported stderr {float(s.mean()):.3f} (rms {float(s.pow(2).mean().sqrt()):.3f}); K=512 stderr {float(ref_se[m].mean()):.3f}")
