"""A training with monitors under DDP (gloo, CPU) or in one process, for tests/test_ddp.py.

    python -m tests.ddp_script OUT.h5 --devices 2 [--monitors probe,ntk,...] [--fail-rank 1]

Same global batch either way: DDP with 2 devices and per-device batch B/2 on an unshuffled
DistributedSampler sees, at each step, exactly the examples of the single-process batch B.
"""
import argparse
import os
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_ntk import callbacks
from lightning_ntk.probe import Probe
from lightning_ntk.schedule import EveryNSteps

from .models import blob_data, make_module, namespace, tiny_net

GLOBAL_BATCH = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORS = ["probe", "ntk", "codes", "representations", "sharpness", "forgetting"]


def launch(path, devices, monitors, extra=(), timeout=240):
    """Run this script in a subprocess (for the tests); returns (CompletedProcess, seconds)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LOCAL_RANK", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tests.ddp_script", path, "--devices", str(devices),
                           "--monitors", ",".join(monitors), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - started


class Boom(RuntimeError):
    pass


def build_monitors(path, names, fail_rank):
    monitors = []
    common = dict(schedule=EveryNSteps(3), on_error="raise", budget=False, overwrite=True, collective_timeout=60)
    for name in names:
        if name == "probe":
            monitors.append(callbacks.ProbeMetricsMonitor(path, probe=Probe(size=24), **common))
        elif name == "ntk":
            monitors.append(callbacks.NTKMonitor(path, probe=Probe(size=24), k=5, **common))
        elif name == "codes":
            monitors.append(callbacks.ActivationCodeMonitor(path, probe=Probe(size=48), heldout=None, **common))
        elif name == "representations":
            monitors.append(callbacks.RepresentationMonitor(path, probe=Probe(size=48), heldout=None,
                                                            few_shot=((3, 2),), n_query=5, episodes=10, **common))
        elif name == "sharpness" and hasattr(callbacks, "SharpnessMonitor"):
            monitors.append(callbacks.SharpnessMonitor(path, sharpness_set=48, k=2, **common))
        elif name == "forgetting" and hasattr(callbacks, "ForgettingMonitor"):
            monitors.append(callbacks.ForgettingMonitor(path, on_error="raise", overwrite=True, budget=False,
                                                        collective_timeout=60))
    if fail_rank is not None:
        class Failing(callbacks.ProbeMetricsMonitor):
            def measure(self, trainer, pl_module, probe):
                if trainer.global_rank == fail_rank and trainer.global_step >= 3:
                    raise Boom(f"injected failure on rank {fail_rank}")
                return super().measure(trainer, pl_module, probe)

        monitors.append(Failing(path, name="failing", probe=Probe(size=24), **common))
    return monitors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--monitors", default="probe")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--namespace", default="lightning.pytorch")
    parser.add_argument("--n", type=int, default=96, help="training examples (97: the sampler pads)")
    args = parser.parse_args()
    L = namespace(args.namespace)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    monitors = build_monitors(args.path, [m for m in args.monitors.split(",") if m], args.fail_rank)
    strategy = "ddp" if args.devices > 1 else "auto"
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices, strategy=strategy,
                        callbacks=monitors, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, use_distributed_sampler=False)

    class Data(L.LightningDataModule):
        """Unshuffled DistributedSampler (Lightning's own would shuffle): rank r sees r, r+W, ..."""

        def train_dataloader(self):
            data = blob_data(n=args.n)
            sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                         shuffle=False)
            return DataLoader(data, batch_size=GLOBAL_BATCH // self.trainer.world_size, sampler=sampler)

    module = make_module(L, tiny_net(), lr=0.1)  # no BatchNorm: per-rank batch statistics differ
    trainer.fit(module, datamodule=Data())
    if trainer.is_global_zero:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, args.path + ".weights.pt")
        print("DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
