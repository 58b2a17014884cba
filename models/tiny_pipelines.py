"""Tiny Stable Diffusion pipelines built from config and saved in diffusers layout, for tests and smoke
runs with no download: a CLIP tokenizer whose vocabulary is written here, tiny CLIP text encoder(s),
a tiny UNet2DConditionModel and AutoencoderKL, and the model family's own scheduler config.

The folders are loaded exactly as a real snapshot is (`from_pretrained(local path)`), so they exercise
the same code paths: SD 1.5 (one encoder, eps), SD 2 (v-prediction), SDXL (two encoders, pooled
text_embeds, micro-conditioning time_ids), SD3 (MMDiT transformer, CLIP-L + CLIP-G + T5 or no T5,
rectified flow with shift, a VAE with shift_factor), Flux (CLIP pooled + T5 tokens, packed latents,
guidance embedding, dynamic shift).
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_KINDS = ("sd15", "sd2", "sdxl", "sd3", "flux")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (printable bytes map to
    themselves, the others to code points from 256 on), so every UTF-8 text tokenizes with no unknowns."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiny_clip_tokenizer(max_length: int = 16):
    """A CLIPTokenizer over single bytes (and byte + "</w>" word ends) plus a few merges of common words,
    BOS/EOS last (as in CLIP, where they are 49406/49407); pads with EOS as SD 1.x does. Written as
    vocab.json + merges.txt into a temporary folder and loaded from there, as a real tokenizer folder is."""
    import json
    import tempfile

    from transformers import CLIPTokenizer

    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"), ("o", "f</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(d, model_max_length=max_length, bos_token=BOS, eos_token=EOS,
                                             pad_token=EOS, unk_token=EOS, local_files_only=True)


def tiny_clip_text_encoder(tokenizer, hidden: int = 32, layers: int = 2, projection: int | None = None, seed: int = 0):
    """A randomly initialised CLIPTextModel (or CLIPTextModelWithProjection when `projection` is given)
    whose vocabulary, positions and EOS id fit `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, hidden_act="gelu", projection_dim=projection or hidden)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def tiny_unet(cross_attention_dim: int = 32, sdxl_pooled_dim: int | None = None, sample_size: int = 8, seed: int = 0):
    """A UNet2DConditionModel with two levels (the second with cross-attention); with `sdxl_pooled_dim`, SDXL's
    "text_time" added conditions (6 time ids of addition_time_embed_dim each + the pooled embedding)."""
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl_pooled_dim is not None:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + sdxl_pooled_dim, use_linear_projection=True)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8, **extra).eval()


def tiny_vae(seed: int = 0, scaling_factor: float = 0.18215, shift_factor: float | None = None):
    """A two-level AutoencoderKL (latents 2x smaller than images, 4 channels) with SD's scaling factor
    (SD3's: scaling 1.5305 and shift 0.0609)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1, sample_size=16, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def tiny_t5(d_model: int = 48, seed: int = 0):
    """(T5 tokenizer, T5EncoderModel): a unigram vocabulary of letters and a few words, one tiny layer."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = ["\u2581" + w for w in ("a", "cat", "the", "dog", "of", "red", "car")]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("0"), ord("9") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(w, -3.0) for w in words] + [(c, -5.0) for c in letters] + [("\u2581" + c, -4.0) for c in letters]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return tok, T5EncoderModel(cfg).eval()


def sd_scheduler(kind: str):
    """The family's own DDIM scheduler config (SD 1.5's and SDXL's: scaled-linear betas 0.00085..0.012,
    leading spacing with steps_offset 1; SD 2: v-prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="v_prediction" if kind == "sd2" else "epsilon")


def tiny_sd3_pipeline(seed: int = 0):
    """A tiny StableDiffusion3Pipeline: CLIP-L and CLIP-G with projections (16 + 16 wide, zero-padded to T5's 48),
    T5 (leave it out at load time with text_encoder_3=None, as with the real model), an SD3Transformer2DModel of one joint block, the SD3 VAE factors, flow matching with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    enc = tiny_clip_text_encoder(tok, hidden=16, projection=16, seed=seed + 1)
    enc2 = tiny_clip_text_encoder(tok2, hidden=16, projection=16, seed=seed + 2)
    tok3, enc3 = tiny_t5(48, seed + 4)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8).eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(seed + 3, 1.5305, 0.0609), text_encoder=enc, tokenizer=tok,
                                    text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=enc3, tokenizer_3=tok3)


def tiny_flux_pipeline(seed: int = 0):
    """A tiny FluxPipeline (FLUX.1-dev layout): CLIP-L pooled (32 wide) + T5 tokens (48), a FluxTransformer2DModel
    of one double and one single block with the guidance embedding, 4-channel latents packed into 16-wide
    tokens, Flux's VAE factors, the dynamic-shifting flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = tiny_clip_tokenizer()
    enc = tiny_clip_text_encoder(tok, hidden=32, seed=seed + 1)
    tok2, enc2 = tiny_t5(48, seed + 4)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=tiny_vae(seed + 3, 0.3611, 0.1159), text_encoder=enc, tokenizer=tok,
                        text_encoder_2=enc2, tokenizer_2=tok2, transformer=transformer)


def build_tiny_pipeline(kind: str = "sd15", seed: int = 0):
    """A tiny diffusers pipeline of family `kind` ("sd15", "sd2": StableDiffusionPipeline; "sdxl":
    StableDiffusionXLPipeline; "sd3": StableDiffusion3Pipeline; "flux": FluxPipeline), randomly initialised from `seed`."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sd3":
        return tiny_sd3_pipeline(seed)
    if kind == "flux":
        return tiny_flux_pipeline(seed)
    tok = tiny_clip_tokenizer()
    if kind == "sdxl":
        tok2 = tiny_clip_tokenizer()
        enc = tiny_clip_text_encoder(tok, hidden=32, seed=seed + 1)
        enc2 = tiny_clip_text_encoder(tok2, hidden=32, projection=24, seed=seed + 2)
        return StableDiffusionXLPipeline(vae=tiny_vae(seed + 3), text_encoder=enc, text_encoder_2=enc2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=tiny_unet(64, sdxl_pooled_dim=24, seed=seed),
                                         scheduler=sd_scheduler(kind), force_zeros_for_empty_prompt=True)
    enc = tiny_clip_text_encoder(tok, hidden=32, seed=seed + 1)
    return StableDiffusionPipeline(vae=tiny_vae(seed + 3), text_encoder=enc, tokenizer=tok, unet=tiny_unet(32, seed=seed),
                                   scheduler=sd_scheduler(kind), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, kind: str = "sd15", seed: int = 0) -> Path:
    """Build a tiny pipeline and `save_pretrained` it into `path` (diffusers layout: model_index.json,
    unet/, text_encoder/, tokenizer/, vae/, scheduler/ [, text_encoder_2/, tokenizer_2/]). Returns the path."""
    path = Path(path)
    build_tiny_pipeline(kind, seed).save_pretrained(path, safe_serialization=True)
    return path
