"""The floor of a LoRA training step: the transformer `cogtune train` trains, with the same LoRA
(targets, rank, alpha, fp32 adapters), the same optimizer (AdamW with cogtune's defaults) and
batches of the same shapes, in a bare loop: random latents and text, no data, no schedule, no
checkpoints, no logging. What any trainer of this model must spend; bench/run.py measures it beside
cogtune under bench/timed.py.

    python bench/timed.py FLOOR.json bench/floor.py --model MODEL [--gradient_checkpointing] ...
    python bench/timed.py IMPORTS.json bench/floor.py --imports_only   # the imports alone: torch, diffusers, peft
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="A CogVideoX pipeline folder (its transformer is trained).")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--imports_only", action="store_true", help="Import what the loop needs, and stop.")
    args = parser.parse_args()

    import torch
    from diffusers import CogVideoXTransformer3DModel
    from peft import LoraConfig

    if args.imports_only:
        return
    torch.manual_seed(args.seed)
    transformer = CogVideoXTransformer3DModel.from_pretrained(args.model, subfolder="transformer")
    transformer.requires_grad_(False)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    for p in parameters:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=1e-4, eps=1e-8)
    config = transformer.config
    frames = (args.frames - 1) // 4 + 1
    shape = (args.batch, frames, config.in_channels, args.height // 8, args.width // 8)
    transformer.train()
    for _ in range(args.steps):
        latents = torch.randn(shape)
        text = torch.randn(args.batch, config.max_text_seq_length, config.text_embed_dim)
        timesteps = torch.randint(0, 1000, (args.batch,))
        pred = transformer(hidden_states=latents, encoder_hidden_states=text, timestep=timesteps, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
