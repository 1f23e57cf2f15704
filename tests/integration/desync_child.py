"""Entry point for the desync test: maskprune's CLI with rank 1's masks nudged after its first step."""

import os
import sys

import torch

from maskprune import learner
from maskprune.cli import main

real_step = learner.Learner.step


def nudged(self):
    out = real_step(self)
    if self.state.step == 1 and os.environ.get("RANK") == os.environ.get("MASKPRUNE_TEST_DESYNC_RANK"):
        with torch.no_grad():
            self.masks.ffn[0, 0, 0] -= 0.25  # drift that a real bug (or bad kernel) could cause
    return out


learner.Learner.step = nudged
sys.exit(main(["-q", "prune", *sys.argv[1:]]))
