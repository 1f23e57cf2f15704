"""Which hidden channels to cut: the KL to the dense model after a hidden cut alone (no other cut, no training),
for four channel scores: maskprune's (norm-output RMS per norm over the residual, summed), random, a Wanda-like
one (the norm output's norm times its consumers' column norms) and the embedding column norm. Scores on 32
calibration windows, KL on the next 16 (128 tokens each), fp32.

    python bench/hidden_scores.py smollm2-135m bench/results/2026-12-04-hidden-scores.json
"""

import json
import sys
import time

import torch

from maskprune.arch import adapter_for
from maskprune.axis_scores import hidden_channel_scores, kl_to, teacher_logits
from maskprune.data import calibration_windows
from maskprune.models import load_model
from maskprune.surgery import emulated_cut

torch.set_num_threads(2)
spec = sys.argv[1]
lm = load_model(spec, dtype=torch.float32)
m, tok = lm.model.eval(), lm.tokenizer
ad = adapter_for(m)
ad.unfuse_(m)
win = calibration_windows("default", tok, seq_len=128, num_windows=48)
score_win, test_win = win[:32], win[32:48]
ref = teacher_logits(m, test_win, 4, None)
H = m.config.hidden_size
scores = {}
scores["norm_rms"] = hidden_channel_scores(m, ad, score_win, 4)[0]
g = torch.Generator().manual_seed(0)
scores["random"] = torch.rand(H, generator=g)
# consumer-weighted (Wanda-like): per norm, ||x_c|| * ||W_consumers[:, c]||, summed over the layer's consumers
norms = []
for layer in ad.layers(m):
    norms += [n for _, n in ad.residual_norms(layer, H)]
sumsq = {}


def hook(k):
    def fn(_m, _a, out):
        sumsq[k] = sumsq.get(k, 0) + out.detach().double().pow(2).reshape(-1, H).sum(0)

    return fn


hs = [n.register_forward_hook(hook(i)) for i, n in enumerate(norms)]
with torch.no_grad():
    for i in range(0, 32, 4):
        m(input_ids=score_win[i : i + 4])
for h in hs:
    h.remove()
cons = torch.zeros(H, dtype=torch.float64)
li = 0
for layer in ad.layers(m):
    rn = ad.residual_norms(layer, H)
    # llama-style: first residual norm feeds q,k,v; second feeds gate,up
    groups = [("q", "k", "v"), ("gate", "up")]
    for (name, n), roles in zip(rn[:2], groups):
        k = norms.index(n)
        xn = sumsq[k].sqrt()
        wn = sum(ad.proj(layer, r).weight.detach().double().pow(2).sum(0) for r in roles).sqrt()
        cons += xn * wn / (xn * wn).mean()
scores["consumer_wanda"] = cons.float()
emb = ad.embedding(m).weight.detach().double()
scores["embed_norm"] = emb.pow(2).sum(0).sqrt().float()
rows = []
for frac in (0.05, 0.1, 0.2):
    keep_n = H - int(round(frac * H / 8)) * 8
    for name, sc in scores.items():
        keep = torch.sort(sc, descending=True).indices[:keep_n].sort().values
        t = time.time()
        with emulated_cut(m, ad, keep_hidden=keep):
            kl = kl_to(m, test_win, ref, 4, direction="teacher_student", autocast=None)
        rows.append((frac, keep_n, name, kl))
        print(frac, keep_n, name, round(kl, 4), flush=True)
json.dump(rows, open(sys.argv[2], "w"))
