"""Run by the training tests under torchrun: `ddp_run.py [method] flags...` trains with <method>.main
(default hpm), then every rank saves its own weights. With KILL_RANK=r in the environment, rank r kills itself
(SIGKILL, as a crashed node would) right after the first checkpoint of torchrun's first round of workers."""
import importlib
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import training  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    method = importlib.import_module(args.pop(0) if args and not args[0].startswith("-") else "hpm")
    cfg = training.parse_config(method.Config, args)
    kill = os.environ.get("KILL_RANK")
    if kill is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        save = training.save_checkpoint

        def save_then_die(*a, **kw):
            save(*a, **kw)
            if os.environ["RANK"] == kill:
                os.kill(os.getpid(), signal.SIGKILL)
        training.save_checkpoint = save_then_die
    model = method.main(cfg)
    torch.save(model.state_dict(), os.path.join(cfg.output_dir, f"rank{os.environ['RANK']}.pt"))
