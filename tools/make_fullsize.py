#!/usr/bin/env python3
"""Random-weight checkpoints with the real full-size configurations, and transformers' reference
outputs for them (issues 4 and 6). Run on the GPU machine from the repository root:

    python3 tools/make_fullsize.py --model qwen2-vl-7b --out /tmp/fs [--reference]

--model: qwen2-vl-7b, qwen2.5-vl-7b, llava-1.5-7b, llama3-llava-next-8b (comma-separated for several).
Writes <out>/<model>/ (bf16 safetensors as save_pretrained writes them, the processor's files, and
the small tokenizer of the bundled model or of the tiny fixtures: the vocabulary size is the real
one, but only the tokenizer's first ids occur). With --reference also <out>/<model>.reference.safetensors
(one image prompt: input ids, pixel values, the first step's logits in bf16 and with the same
weights in float32, 32 greedy tokens in bf16, the bf16 input embeddings and last-token hidden states) and
<out>/<model>.timing.json (load time, prefill and decode tokens/s under transformers, bf16, sdpa).
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as fx  # noqa: E402

ROOT = fx.ROOT
IMAGE = os.path.join(ROOT, "tests", "fixtures", "preprocess", "photo333x250.jpg")
QUESTION = "Describe the image."

QWEN2_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32768,
                  tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


def qwen_dir_assets(mdir, processor_class):
    fx.copy_text_assets(mdir)
    pc = fx.qwen_preprocessor_config(56 * 56, 28 * 28 * 1280, "size")
    pc["processor_class"] = processor_class
    with open(os.path.join(mdir, "preprocessor_config.json"), "w") as f:
        json.dump(pc, f, indent=1)


def build(name):
    """(model class, config, writer of the processor files into a directory)."""
    import transformers as tr
    if name == "qwen2-vl-7b":
        vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="quick_gelu")
        cfg = tr.Qwen2VLConfig(text_config=QWEN2_TEXT, vision_config=vision, image_token_id=5, video_token_id=6,
                               vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=False)
        return tr.Qwen2VLForConditionalGeneration, cfg, lambda d: qwen_dir_assets(d, "Qwen2VLProcessor")
    if name == "qwen2.5-vl-7b":
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="silu",
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
        cfg = tr.Qwen2_5_VLConfig(text_config=QWEN2_TEXT, vision_config=vision, image_token_id=5, video_token_id=6,
                                  vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=False)
        return tr.Qwen2_5_VLForConditionalGeneration, cfg, lambda d: qwen_dir_assets(d, "Qwen2_5_VLProcessor")
    if name in ("llava-1.5-7b", "llama3-llava-next-8b"):
        next_ = name == "llama3-llava-next-8b"
        tok, bos, eos = fx.llava_tokenizer("llama3" if next_ else "llama-legacy",
                                           os.path.join(ROOT, "tests", "fixtures", "tokenizer"))
        if next_:
            text = tr.LlamaConfig(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                                  max_position_embeddings=8192, bos_token_id=bos, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
            text.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
        else:
            text = tr.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                                  max_position_embeddings=4096, bos_token_id=bos, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
            text.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        image_id = tok.convert_tokens_to_ids("<image>")
        vision = tr.CLIPVisionConfig(**CLIP_L_336)
        if next_:
            pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
            cfg = tr.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                     image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                                     vision_feature_select_strategy="default", projector_hidden_act="gelu",
                                     image_seq_length=576, tie_word_embeddings=False)
            cls = tr.LlavaNextForConditionalGeneration
            ip = tr.LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                            image_grid_pinpoints=pinpoints, do_center_crop=True, resample=3,
                                            do_pad=True)
            proc = tr.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                         vision_feature_select_strategy="default", chat_template=fx.LLAMA3_TEMPLATE,
                                         num_additional_image_tokens=1, image_token="<image>")
        else:
            cfg = tr.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                 vision_feature_layer=-2, vision_feature_select_strategy="default",
                                 projector_hidden_act="gelu", image_seq_length=576, tie_word_embeddings=False)
            cls = tr.LlavaForConditionalGeneration
            ip = tr.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                       do_center_crop=True, resample=3)
            proc = tr.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                     vision_feature_select_strategy="default", chat_template=fx.LLAVA_TEMPLATE,
                                     num_additional_image_tokens=1, image_token="<image>")

        def assets(d):
            proc.save_pretrained(d)
            with open(os.path.join(d, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}, f)
        return cls, cfg, assets
    raise SystemExit(f"unknown model {name}")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make(name, out, reference):
    from transformers import AutoProcessor
    from PIL import Image
    cls, cfg, assets = build(name)
    mdir = os.path.join(out, name)
    t0 = time.time()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = cls(cfg).eval()
    torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(mdir, max_shard_size="5GB")
    assets(mdir)
    fx.log(f"{name}: {n / 1e9:.2f}B parameters written to {mdir} in {time.time() - t0:.0f} s")
    del model
    torch.cuda.empty_cache()
    if not reference:
        return
    t0 = time.time()
    model = cls.from_pretrained(mdir, dtype=torch.bfloat16, device_map=dev).eval()
    sync()
    load_s = time.time() - t0
    processor = AutoProcessor.from_pretrained(mdir)
    msgs = fx.qwen_messages(["photo"], QUESTION)
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(IMAGE)], return_tensors="pt").to(dev)
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out1 = model(**inputs, output_hidden_states=True)
        sync()
        t0 = time.time()
        for _ in range(3):
            model(**inputs)
        sync()
        prefill_s = (time.time() - t0) / 3
        gen_kw = dict(do_sample=False, min_new_tokens=32, max_new_tokens=32)
        gen = model.generate(**inputs, **gen_kw)
        sync()
        t0 = time.time()
        model.generate(**inputs, do_sample=False, max_new_tokens=1)
        sync()
        t1 = time.time()
        model.generate(**inputs, **gen_kw)
        sync()
        t32 = time.time()
    decode_tok_s = 31.0 / max(1e-9, (t32 - t1) - (t1 - t0))
    # The same weights in float32 (no TF32): the exactness reference; its distance to the bf16 logits
    # is the size of bf16's own rounding on this random network.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.float()
    with torch.no_grad():
        logits_f32 = model(**inputs).logits[0, -1].float()
    tensors = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
               "pixel_values": inputs["pixel_values"].float(), "logits": out1.logits[0, -1].float(),
               "logits_f32": logits_f32, "generated": gen[0, T:],
               # Where bf16 rounding differences start: the input embeddings [T, d] and the last
               # token's hidden state after each layer [L + 1, d] (output_hidden_states).
               "embeddings": out1.hidden_states[0][0].float(),
               "hidden_last": torch.stack([h[0, -1] for h in out1.hidden_states]).float()}
    for k in ("image_grid_thw", "image_sizes"):
        if k in inputs:
            tensors[k] = inputs[k]
    fx.save_tensors(os.path.join(out, name + ".reference.safetensors"), tensors)
    timing = {"model": name, "parameters": n, "prompt_tokens": T, "load_s": load_s, "prefill_tok_s": T / prefill_s,
              "decode_tok_s": decode_tok_s, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "torch": torch.__version__, "prompt": text}
    with open(os.path.join(out, name + ".timing.json"), "w") as f:
        json.dump(timing, f, indent=1)
    fx.log(json.dumps(timing))
    del model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", action="store_true")
    args = ap.parse_args()
    import transformers
    fx.log("torch", torch.__version__, "transformers", transformers.__version__)
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for name in args.model.split(","):
        try:
            make(name, args.out, args.reference)
        except Exception:
            import traceback
            traceback.print_exc()
            failed.append(name)
    if failed:
        fx.log("FAILED:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
