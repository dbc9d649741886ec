"""Run by the distributed tests under torchrun: one training process, which then writes the LoRA
tensors it holds to OUTPUT_DIR/rank<N>.safetensors so that the test can compare the ranks."""

import sys
from pathlib import Path

from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from cogtune import train
from cogtune.config import data_settings, load_config

if __name__ == "__main__":
    argv = sys.argv[1:]
    config = load_config("train", argv)
    result = train.run(config, data_settings(config, argv))
    weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(result.transformer).items()}
    import os

    save_file(weights, str(Path(config.output_dir) / f"rank{os.environ.get('RANK', '0')}.safetensors"))
