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
from maskprune.surgery import emulated_cut, rescale_norms_, residual_norm_modules

torch.set_num_threads(2)
lm = load_model(sys.argv[1], dtype=torch.float32)
m, tok = lm.model.eval(), lm.tokenizer
ad = adapter_for(m)
ad.unfuse_(m)
win = calibration_windows("default", tok, seq_len=128, num_windows=48)
score_win, test_win = win[:32], win[32:48]
ref = teacher_logits(m, test_win, 4, None)
H = m.config.hidden_size
sc, energy = hidden_channel_scores(m, ad, score_win, 4)  # the channel scores and each norm's input energy
norms = residual_norm_modules(m, ad)
for frac in (0.05, 0.1, 0.2):
    keep_n = H - int(round(frac * H / 8)) * 8
    keep = torch.sort(sc, descending=True).indices[:keep_n].sort().values
    with emulated_cut(m, ad, keep_hidden=keep):
        base = kl_to(m, test_win, ref, 4, direction="teacher_student", autocast=None)
    saved = [n.weight.detach().clone() for n in norms]
    with torch.no_grad():
        rescale_norms_(m, ad, energy, keep)  # what the hidden cut does
        with emulated_cut(m, ad, keep_hidden=keep):
            fixed = kl_to(m, test_win, ref, 4, direction="teacher_student", autocast=None)
        for n, w in zip(norms, saved):
            n.weight.copy_(w)
    print(frac, keep_n, "plain", round(base, 4), "rescaled", round(fixed, 4), flush=True)
