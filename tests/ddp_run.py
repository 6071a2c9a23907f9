"""Run by the training tests under torchrun: `ddp_run.py [method] flags...` trains with <method>.main
(default hpm), then every rank saves its own weights."""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    method = importlib.import_module(args.pop(0) if args and not args[0].startswith("-") else "hpm")
    cfg = common.parse_config(method.Config, args)
    model = method.main(cfg)
    torch.save(model.state_dict(), os.path.join(cfg.output_dir, f"rank{os.environ['RANK']}.pt"))
