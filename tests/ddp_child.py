"""One rank of a 2-process gloo fine-tuning job, for tests/test_ddp.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_child.py <out_dir>

Each rank writes rank<r>.pt (its final weights) and rank<r>_rows.txt (the
training rows it read); only rank 0's on_epoch callback may write epochs.txt.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from finetune_toys import loop_config, tiny_classifier, toy_data  # noqa: E402

from xfer.finetune import finetune  # noqa: E402
from xfer.io import save_torch  # noqa: E402


class RecordingRows(torch.utils.data.Dataset):
    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return self.inner[i]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(out_dir)
    torch.set_num_threads(1)
    model, _ = tiny_classifier()
    if rank == 1:  # a different start: rank 0's weights must win
        with torch.no_grad():
            model.head.classifier.weight.add_(1.0)

    def log(epoch, record):
        with open(out / "epochs.txt", "a") as f:
            f.write(f"{epoch} {rank}\n")

    cfg = loop_config(epochs=2, batch_size=8, lr=3e-3, device="cpu", method="mcc", freeze_bn=False)
    trained, _ = finetune(
        model,
        RecordingRows(toy_data(64, 0), out / f"rank{rank}_rows.txt"),
        toy_data(16, 1),
        cfg,
        torch.device("cpu"),
        seed=0,
        on_epoch=log,
        progress=False,
        checkpoint_dir=out / "ckpt",
        run_key="ddp",
        target=toy_data(32, 5),
    )
    save_torch(out / f"rank{rank}.pt", trained.state_dict())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
