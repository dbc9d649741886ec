"""Stage 2: training a LoRA from the cache. The recipe is `train.recipe.run`; the rest of the folder
is what it calls:

    recipe.py      run(): set-up, the cache, the model, optimizer and schedule, resume, the loop, the LoRA
    data.py        the cache as batches: data order, each process's share, the run's plan, the dataset
    step.py        one step's math: randomness, posterior samples, noise schedule, inputs, loss
    model.py       the transformer as training uses it (LoRA, fp8 storage, compile; or on meta)
    lora.py        what a run leaves: the LoRA file and cogtune_lora.json
    log.py         train_log.jsonl and what each step reports
    checkpoint.py  checkpoints, saved atomically and read without pickle
    optim.py       optimizers and the CPU-offloaded optimizer
    memory.py      the --dry_run estimate, and live tensor bytes to check it
    validation.py  validation videos from cached embeddings (T5 never loaded)
    report.py      trackers, the loss curve, the model card, the hub
"""

from cogtune.train.memory import dry_run
from cogtune.train.recipe import TrainResult, run

__all__ = ["TrainResult", "dry_run", "run"]
