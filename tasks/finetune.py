"""finetune stage: fine-tune by the configured strategy (xfer/finetune_job.py), then track it.

One process, or `finetune.devices` torchrun workers whose rank 0 writes the
outputs; either way this process logs the epochs and the model to MLflow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import timm
import torch
from mlflow.models import infer_signature
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer import finetune_job
from xfer.checkpoints import remove_checkpoint
from xfer.config import Params
from xfer.finetune import Classifier, ClassifierSpec, load_classifier, select_device
from xfer.layout import Layout
from xfer.plots import save_learning_curves
from xfer.procs import lifeline, owner_env


def log_model(model: Classifier, spec: ClassifierSpec) -> None:
    """The fine-tuned model as an MLflow pytorch model with a signature."""
    model = model.cpu().eval()
    size = spec.preprocessing["image_size"]
    # Batch of 2: torch.export pins a size-1 dimension, and the logged model must take any batch.
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        # Explicit requirements skip MLflow's slow import-scanning inference.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}", f"numpy=={np.__version__}"],
    )


@task(name="finetune", cache_policy=NO_CACHE)
def finetune(layout: Layout, params: Params) -> dict:
    logger = get_run_logger()
    cfg = params.finetune
    with stage_run("finetune", layout, params) as run:
        with run.work():
            method = finetune_job.resolve_method(cfg, layout.head_pick).method
            shown = f"auto: the head's pick, {method}" if cfg.method == "auto" else method
            logger.info("fine-tuning (%s, %s) on %s x %d", cfg.strategy, shown, select_device(cfg.device), cfg.devices)
            if cfg.devices == 1:
                result = finetune_job.run(layout, params, on_epoch=run.epoch_logger("finetune"), keep_checkpoint=True)
                model, spec, summary, history = result.model, result.spec, result.summary, result.history
            else:
                launch_workers(layout, cfg.devices)
                history = finetune_job.read_history(layout)
                for epoch, record in enumerate(history):
                    run.epoch_logger("finetune")(epoch, record)
                model, spec = load_classifier(layout.finetune_dir)
                summary = json.loads(layout.metrics("finetune").read_text())
            # Epoch 0 is the model before any step (the probe-started classifier, for lp_ft).
            _, curves = save_learning_curves(
                layout.stage_plots("finetune"),
                history,
                first_epoch=0,
                title=f"finetune ({cfg.strategy}, {summary['method']}); epoch kept: {summary['best_epoch']} by {cfg.selection}",
            )
        run.log_metrics(summary, prefix="best.")
        run.log_artifact(layout.metrics("finetune"))
        run.log_artifact(curves, "plots")
        started = time.perf_counter()
        log_model(model, spec)
        run.log_metrics({"time.log_model_s": time.perf_counter() - started})
    # Only now: killed before this point, a rerun resumes at the last epoch rather than train again.
    remove_checkpoint(finetune_job.checkpoint_dir(layout))
    return summary


def launch_workers(layout: Layout, processes: int) -> None:
    """torchrun on this machine: `processes` workers of xfer.finetune_job; raises if any fails.

    The rendezvous listens on 127.0.0.1 only (xfer/torchrun.py), as do gloo's
    and NCCL's sockets unless the environment names an interface. torchrun
    dies with this process (parent-death signal), its workers with torchrun,
    and a worker whose stage has died writes nothing (xfer/procs.py).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "xfer.torchrun",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        f"--nproc_per_node={processes}",
        "-m",
        "xfer.finetune_job",
        "--root",
        str(layout.root),
    ]
    # Workers are fresh interpreters: they must not start a Prefect server or an MLflow run.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_RUN"))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    env.update(owner_env())
    subprocess.run(command, check=True, env=env, preexec_fn=lifeline())
