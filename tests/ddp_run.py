"""Run by test_train.py under torchrun: train with hpm.main, then every rank saves its own weights."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import hpm  # noqa: E402

if __name__ == "__main__":
    cfg = common.parse_config(hpm.Config, sys.argv[1:])
    model = hpm.main(cfg)
    torch.save(model.state_dict(), os.path.join(cfg.output_dir, f"rank{os.environ['RANK']}.pt"))
