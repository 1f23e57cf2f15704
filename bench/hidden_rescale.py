"""Does a calibrated norm rescale make a hidden cut cheaper? A norm over the kept channels divides by their RMS,
not the whole residual's; this scales each norm's output by the calibration ratio rms(kept) / rms(all) of its
input and compares the KL after the hidden cut alone with and without it (same windows as hidden_scores.py).

    python bench/hidden_rescale.py smollm2-135m
"""

import sys

import torch

from maskprune.arch import adapter_for
from maskprune.axis_scores import hidden_channel_scores, kl_to, teacher_logits
from maskprune.data import calibration_windows
from maskprune.models import load_model
from maskprune.surgery import emulated_cut

torch.set_num_threads(2)
lm = load_model(sys.argv[1], dtype=torch.float32)
m, tok = lm.model.eval(), lm.tokenizer
ad = adapter_for(m)
ad.unfuse_(m)
win = calibration_windows("default", tok, seq_len=128, num_windows=48)
score_win, test_win = win[:32], win[32:48]
ref = teacher_logits(m, test_win, 4, None)
H = m.config.hidden_size
sc = hidden_channel_scores(m, ad, score_win, 4)[0]
norms = [n for layer in ad.layers(m) for _, n in ad.residual_norms(layer, H)] + [ad.final_norm(m)]


def input_energy():
    acc = [torch.zeros(H, dtype=torch.float64) for _ in norms]

    def hook(k):
        def fn(_m, args):
            acc[k] += args[0].detach().double().pow(2).reshape(-1, H).sum(0)

        return fn

    hs = [n.register_forward_pre_hook(hook(i)) for i, n in enumerate(norms)]
    with torch.no_grad():
        for i in range(0, 32, 4):
            m(input_ids=score_win[i : i + 4])
    for h in hs:
        h.remove()
    return acc


energy = input_energy()
off = ad.norm_offset
for frac in (0.05, 0.1, 0.2):
    keep_n = H - int(round(frac * H / 8)) * 8
    keep = torch.sort(sc, descending=True).indices[:keep_n].sort().values
    with emulated_cut(m, ad, keep_hidden=keep):
        base = kl_to(m, test_win, ref, 4, direction="teacher_student", autocast=None)
    # rescale: the sliced norm divides by rms over kept channels; scale its output by rms_kept / rms_all
    saved = [n.weight.detach().clone() for n in norms]
    with torch.no_grad():
        for n, e in zip(norms, energy):
            c = float((e[keep].sum() / keep_n).sqrt() / (e.sum() / H).sqrt())
            n.weight.copy_((n.weight + off) * c - off)
    with emulated_cut(m, ad, keep_hidden=keep):
        fixed = kl_to(m, test_win, ref, 4, direction="teacher_student", autocast=None)
    with torch.no_grad():
        for n, w in zip(norms, saved):
            n.weight.copy_(w)
    print(frac, keep_n, "plain", round(base, 4), "rescaled", round(fixed, 4), flush=True)
