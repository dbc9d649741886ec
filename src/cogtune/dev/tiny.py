"""Hub-free tiny pipelines of every variant the family registry knows, and demo clips, for the demo
and the tests.

A tiny pipeline has its variant's real structure (the T5 or UMT5 encoder, the 3D VAE, the
transformer with its image inputs, CLIP and the second expert where the variant has them, the real
models' scheduler settings) with random weights a few hundred kilobytes in size, so every stage runs
on a CPU in seconds and nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch

from cogtune.errors import CogtuneError
from cogtune.families import VARIANTS
from cogtune.families.cogvideox import CogVideoX
from cogtune.families.wan import Wan
from cogtune.util.media import write_mp4

# Scheduler settings of the published CogVideoX-2b / -5b pipelines (scheduler/scheduler_config.json).
SCHEDULER_2B = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
    num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
    set_alpha_to_one=True, snr_shift_scale=3.0, steps_offset=0, timestep_spacing="trailing",
)
SCHEDULER_5B = dict(SCHEDULER_2B, snr_shift_scale=1.0)

# The structural flags of each CogVideoX variant, as in the published configs (see
# families/cogvideox.py); the tiny model keeps them and shrinks every width.
ROPE_5B = dict(use_rotary_positional_embeddings=True)
ROPE_15 = dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False)
COGVIDEOX_VARIANTS = {
    "2b": dict(transformer={}, vae=dict(scaling_factor=1.15258426), scheduler=SCHEDULER_2B),
    "5b": dict(transformer=ROPE_5B, vae=dict(scaling_factor=0.7), scheduler=SCHEDULER_5B),
    "5b-i2v": dict(transformer=dict(ROPE_5B, use_learned_positional_embeddings=True), image_conditioned=True,
                   vae=dict(scaling_factor=0.7), scheduler=SCHEDULER_5B),
    "1.5-5b": dict(transformer=ROPE_15, vae=dict(scaling_factor=0.7, invert_scale_latents=True),
                   scheduler=SCHEDULER_5B),
    "1.5-5b-i2v": dict(transformer=dict(ROPE_15, ofs_embed_dim=8), image_conditioned=True,
                       vae=dict(scaling_factor=0.7, invert_scale_latents=True), scheduler=SCHEDULER_5B),
}

TEXT_DIM = 32
MAX_TEXT_LENGTH = 32  # the real models use 226
WORDS = (
    "a an the of in on with and to is are red blue green yellow white black orange purple square circle ball "
    "moves moving left right up down across over slowly quickly bright dark background video small large "
    "bouncing scene camera static panning cat dog runs jumps water sky tree light shadow person walks street "
    "night day sun rain snow car road city forest river mountain close-up wide shot animated style"
).split()


def make_tokenizer(max_length: int = MAX_TEXT_LENGTH):
    """A T5 tokenizer whose vocabulary is built here: whole words, then single characters, as a
    sentencepiece-style unigram model (the published T5 tokenizers are of that kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -5.0) for word in WORDS]
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces += [(f"▁{c}", -9.0) for c in characters] + [(c, -10.0) for c in characters]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)


# Widths of each size. "tiny": a few hundred kilobytes, for tests and the demo. "small": for
# benchmarks, with the real models' proportions: a 48M-parameter transformer of 12 layers, T5 with
# 2.8x its parameters, a VAE with a tenth of them, 16 latent channels and the real text length of
# 226. Its native size is 9 frames of 96x160.
SIZES = {
    "tiny": dict(
        text_encoder=dict(d_model=TEXT_DIM, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                          relative_attention_num_buckets=8),
        vae=dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=2),
        transformer=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                         time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8, sample_height=4,
                         max_text_seq_length=MAX_TEXT_LENGTH),
    ),
    "small": dict(  # T5 v1.1 shapes (gated GELU, d_ff 2.5 x d_model, heads of 64) at a quarter of XXL's width
        text_encoder=dict(d_model=1024, d_ff=2560, d_kv=64, num_heads=16, num_layers=11,
                          relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"),
        vae=dict(block_out_channels=(48, 80, 80, 80), latent_channels=16, norm_num_groups=8),
        transformer=dict(num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16,
                         time_embed_dim=128, text_embed_dim=1024, num_layers=12, sample_width=20, sample_height=12,
                         max_text_seq_length=226),
    ),
}


def make_tiny_pipeline(family: str = "2b", seed: int = 0, size: str = "tiny"):
    """A random-weight pipeline of a variant the family registry knows (`cogtune init --family`
    names), with the widths of SIZES[size]."""
    family_class = VARIANTS[family][0] if family in VARIANTS else None
    if family_class not in BUILDERS:
        raise CogtuneError(f"No tiny model for --family {family}: choose one of {', '.join(sorted(FAMILIES))}.")
    return BUILDERS[family_class](family, seed, size)


def make_tiny_cogvideox(family: str, seed: int, size: str):
    """A CogVideoX variant's structure. The tiny one's native size (the learned positional embeddings
    of 5b-i2v) is 9 frames of 32x64."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    spec, widths = COGVIDEOX_VARIANTS[family], SIZES[size]
    tokenizer = make_tokenizer(widths["transformer"]["max_text_seq_length"])
    # Each part is seeded on its own: otherwise the VAE's and the transformer's weights would depend
    # on how many random numbers the T5 initialisation of the installed transformers draws.
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), decoder_start_token_id=0,
                                           **widths["text_encoder"]))
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        layers_per_block=1, temporal_compression_ratio=4, **widths["vae"], **spec["vae"],
    )
    transformer_config = dict(widths["transformer"], sample_frames=9, patch_size=2, temporal_compression_ratio=4)
    transformer_config.update(spec["transformer"])
    if "patch_size_t" in transformer_config:  # 1.5: the sample size is the slice grid's maximum size
        transformer_config["sample_height"] = transformer_config["sample_width"] = max(
            16, transformer_config["sample_height"], transformer_config["sample_width"])
    if spec.get("image_conditioned"):  # the image latents are concatenated on channels
        transformer_config["in_channels"] *= 2
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(**transformer_config)
    scheduler = CogVideoXDDIMScheduler(**spec["scheduler"])
    pipeline = CogVideoXImageToVideoPipeline if spec.get("image_conditioned") else CogVideoXPipeline
    return pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                    scheduler=scheduler)


# The structural flags of each Wan variant, as diffusers' conversion script (scripts/convert_wan_to_diffusers.py)
# builds the published pipelines: what the transformer takes, the VAE, CLIP, the experts, the flow shift.
WAN_T2V = dict(flow_shift=3.0)
WAN_VARIANTS = {
    "wan2.1-t2v-1.3b": WAN_T2V,
    "wan2.1-t2v-14b": WAN_T2V,
    "wan2.1-i2v-14b-480p": dict(flow_shift=3.0, image="channels", clip=True),
    "wan2.1-i2v-14b-720p": dict(flow_shift=3.0, image="channels", clip=True),
    "wan2.2-ti2v-5b": dict(flow_shift=5.0, vae22=True, expand_timesteps=True),
    "wan2.2-t2v-a14b": dict(flow_shift=3.0, boundary_ratio=0.875),
    "wan2.2-i2v-a14b": dict(flow_shift=3.0, image="channels", boundary_ratio=0.9),
}
# Variants whose tiny models are the same structure as another's (they differ in widths only).
TINY_ALIASES = {"wan2.1-t2v-14b": "wan2.1-t2v-1.3b", "wan2.1-i2v-14b-720p": "wan2.1-i2v-14b-480p"}
WAN_SIZES = {
    "tiny": dict(text_encoder=dict(d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8),
                 transformer=dict(num_attention_heads=2, attention_head_dim=8, freq_dim=16, ffn_dim=32, num_layers=2),
                 vae=dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1), z_dim=4,
                 clip=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8)),
    "small": dict(text_encoder=dict(d_model=1024, d_ff=2560, d_kv=64, num_heads=16, num_layers=11,
                                    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"),
                  transformer=dict(num_attention_heads=8, attention_head_dim=64, freq_dim=256, ffn_dim=2048,
                                   num_layers=12),
                  vae=dict(base_dim=32, dim_mult=[1, 2, 2, 2], num_res_blocks=1), z_dim=16,
                  clip=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=112, patch_size=14)),
}


def make_tiny_wan(family: str, seed: int, size: str):
    """A Wan variant's structure: UMT5, the Wan VAE (2.2's: 16x and patchified, for TI2V), the Wan
    transformer with its image inputs, CLIP for 2.1 I2V, two experts for 2.2 A14B."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                           WanTransformer3DModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    spec, widths = WAN_VARIANTS[family], WAN_SIZES[size]
    z_dim = widths["z_dim"]
    tokenizer = make_tokenizer(512)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **widths["text_encoder"]))
    torch.manual_seed(seed)
    moments = dict(latents_mean=[0.1 * (i % 5) - 0.2 for i in range(z_dim)],
                   latents_std=[1.0 + 0.25 * (i % 3) for i in range(z_dim)])
    if spec.get("vae22"):  # the Wan 2.2 VAE: pixels patchified by 2, residual blocks, 16x in all
        vae = AutoencoderKLWan(z_dim=z_dim, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                               scale_factor_spatial=16, temperal_downsample=[False, True, True], **widths["vae"],
                               **moments)
    else:
        vae = AutoencoderKLWan(z_dim=z_dim, temperal_downsample=[False, True, True], **widths["vae"], **moments)
    heads, head_dim = widths["transformer"]["num_attention_heads"], widths["transformer"]["attention_head_dim"]
    config = dict(widths["transformer"], patch_size=(1, 2, 2), in_channels=z_dim, out_channels=z_dim,
                  text_dim=widths["text_encoder"]["d_model"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                  eps=1e-6, rope_max_seq_len=1024)
    parts = {}
    if spec.get("image") == "channels":
        config["in_channels"] = 2 * z_dim + 4  # the latents, the 4 mask channels, the image's latents
    if spec.get("clip"):
        clip = CLIPVisionConfig(**widths["clip"])
        config.update(image_dim=clip.hidden_size, added_kv_proj_dim=heads * head_dim)
        torch.manual_seed(seed)
        parts["image_encoder"] = CLIPVisionModel(clip)
        parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": clip.image_size},
                                                      crop_size={"height": clip.image_size, "width": clip.image_size})
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**config)
    if "boundary_ratio" in spec:
        torch.manual_seed(seed + 1)
        parts["transformer_2"] = WanTransformer3DModel(**config)
        parts["boundary_ratio"] = spec["boundary_ratio"]
    if spec.get("expand_timesteps"):
        parts["expand_timesteps"] = True
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=spec["flow_shift"])
    pipeline = WanImageToVideoPipeline if spec.get("image") else WanPipeline
    return pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                    scheduler=scheduler, **parts)


BUILDERS = {CogVideoX: make_tiny_cogvideox, Wan: make_tiny_wan}  # a family -> its tiny-model builder
FAMILIES = [variant for variant, (family, _) in VARIANTS.items() if family in BUILDERS]


def make_tiny_model(path: str | Path, family: str = "2b", seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight pipeline folder of a variant that from_pretrained loads offline."""
    path = Path(path)
    make_tiny_pipeline(family, seed, size).save_pretrained(path)
    return path.resolve()


# --- demo clips ---------------------------------------------------------------------------------

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 180, 70), "yellow": (230, 210, 40)}


def synthetic_frames(num_frames: int, height: int, width: int, color: tuple, direction: int) -> np.ndarray:
    """A square moving across a gradient: [F, H, W, 3] uint8."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                           np.full_like(x, 96)], axis=-1).astype(np.uint8) // 2
    frames = np.repeat(background[None], num_frames, axis=0)
    side = max(4, height // 3)
    for i in range(num_frames):
        progress = i / max(num_frames - 1, 1)
        left = int((progress if direction > 0 else 1 - progress) * (width - side))
        top = (height - side) // 2
        frames[i, top:top + side, left:left + side] = color
    return frames


def make_demo_data(path: str | Path, num_frames: int = 24, fps: int = 16, height: int = 48, width: int = 64) -> Path:
    """Captioned synthetic clips in the prompts.txt + videos.txt format."""
    root = Path(path)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    prompts, videos = [], []
    for i, (name, color) in enumerate(COLORS.items()):
        direction = 1 if i % 2 == 0 else -1
        relative = f"videos/{i:05d}.mp4"
        write_mp4(root / relative, synthetic_frames(num_frames, height, width, color, direction), fps)
        side = "left to right" if direction > 0 else "right to left"
        prompts.append(f"a {name} square moves slowly from {side} across a dark gradient background")
        videos.append(relative)
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    (root / "README.txt").write_text(json.dumps({"clips": len(videos), "frames": num_frames, "fps": fps}) + "\n")
    return root.resolve()
