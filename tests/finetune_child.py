"""A fine-tuning run in its own process, for the kill-and-resume test.

    python tests/finetune_child.py <out_dir> <checkpoint_dir> <delay_s> [<sampler>]

Writes <out_dir>/weights.pt at the end and appends each finished epoch to <out_dir>/epochs.txt.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from finetune_toys import NoisyData, loop_config, tiny_classifier, toy_data  # noqa: E402

from xfer.finetune import finetune  # noqa: E402
from xfer.io import save_torch  # noqa: E402

CFG = loop_config(
    epochs=4,
    batch_size=16,
    lr=3e-3,
    device="cpu",
    deterministic=True,
    schedule="cosine",
    warmup_epochs=0.5,
    ema_decay=0.9,
    label_smoothing=0.1,
    method="dann",  # a discriminator, its dropout and a second (target) batch stream to restore too
)


def main(out_dir: str, checkpoint_dir: str, delay_s: str, sampler: str = "uniform") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model, _ = tiny_classifier()

    def log(epoch, record):
        with open(out / "epochs.txt", "a") as f:
            f.write(f"{epoch}\n")

    trained, _ = finetune(
        model,
        NoisyData(toy_data(96, 0), float(delay_s)),
        toy_data(32, 1),
        CFG.model_copy(update={"sampler": sampler}),
        torch.device("cpu"),
        seed=0,
        on_epoch=log,
        progress=False,
        checkpoint_dir=Path(checkpoint_dir),
        run_key="child",
        target=NoisyData(toy_data(48, 5)),
    )
    save_torch(out / "weights.pt", trained.state_dict())


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)
