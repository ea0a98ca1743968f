"""A training run in its own process, for the live-reading and kill tests.

    python -m tests.train_script RUN.h5 [--delay SECONDS] [--epochs N] [--namespace NAME]

Prints ``SNAPSHOT <step>`` after each snapshot has been flushed to the run file.
"""
import argparse
import sys
import time

import torch

from lightning_ntk.callbacks import ProbeMetricsMonitor
from lightning_ntk.probe import Probe

from .models import blob_data, loader, make_module, namespace, tiny_net, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--namespace", default="lightning.pytorch")
    args = parser.parse_args()
    L = namespace(args.namespace)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    monitor = ProbeMetricsMonitor(args.path, schedule=1, probe=Probe(size=30), on_error="raise", overwrite=True,
                                  budget=False)

    class Reporter(L.Callback):
        def _report(self, trainer):
            if monitor._last_step == trainer.global_step:
                writer = monitor._store._background
                if writer is not None:  # the writer thread has written what it was handed
                    writer.wait_idle()
                print(f"SNAPSHOT {trainer.global_step}", flush=True)
            time.sleep(args.delay)

        def on_train_start(self, trainer, pl_module):
            self._report(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._report(trainer)

    t = trainer(L, [monitor, Reporter()], max_epochs=args.epochs)
    t.fit(make_module(L, tiny_net()), loader(blob_data()))
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
