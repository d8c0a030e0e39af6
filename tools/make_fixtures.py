#!/usr/bin/env python3
"""Reference fixtures for mlaforge's tests, made with transformers and tokenizers.

Run on the GPU machine (which has torch, transformers 5.17, tokenizers), from the repository root:

    python3 tools/make_fixtures.py --out tests/fixtures [--only tokenizer,preprocess,qwen2vl,shapes]

Everything tiny runs on the CPU in float32 with eager attention, so the fixtures hold 1e-4
(HF_FORMATS.md: TF32 convolutions alone give errors near 1e-3). What it writes:

  tokenizer/<name>/{tokenizer.json,cases.json}   ids from HF tokenizers for a few hundred strings
  preprocess/                                    images, processor configs, the processors' pixel_values
  qwen2vl/<model>/                               tiny random Qwen2-VL checkpoints (two layouts)
  qwen2vl/<model>.cases.json + .safetensors      prompts, ids, pixel_values, logits, hidden states, greedy tokens
  llava/<model>/ and its .cases.json/.safetensors   the same for tiny LLaVA-1.5 checkpoints (MHA and GQA)
  llava_next/<model>/ ...                        tiny LLaVA-NeXT (anyres, Llama-3 and Mistral text), also image_sizes
  qwen25vl/tiny/ ...                             a tiny Qwen2.5-VL (window attention vision tower)
  shapes/                                        the bundled qwen2vl-shapes model: logits for a batch and
                                                 transformers' greedy answers for every eval row
"""
import argparse
import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_MODEL = os.path.join(ROOT, "models", "qwen2vl-shapes")
QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def log(*a):
    print(*a, flush=True)


def save_tensors(path, tensors):
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------
def test_strings():
    """A few hundred strings: special tokens mid-text, digits, unicode (NFC and NFD), whitespace runs."""
    s = [
        "", " ", "  ", "\n", "\n\n", "\r\n", "\t", " \t \n ", "a", "A", "hello", "Hello world",
        "hello  world", "hello   world  ", "  leading", "trailing  ", "What color is the circle?",
        "How many objects are there?", "a small black star in the top left, a large purple square in the left.",
        "Describe the image.", "What is 12 + 34?", "12345", "3.14159", "1,000,000", "-42", "x=1;y=22;z=333",
        "I'm", "you're", "DON'T", "She'll", "they've", "we'd", "it's", "IT'S", "O'Neil's",
        "café", "cafe\u0301", "naïve", "nai\u0308ve", "Straße", "Ångström", "A\u030angstro\u0308m",
        "東京", "你好，世界", "日本語のテキスト", "Привет, мир!", "Γειά σου", "مرحبا", "שלום", "🙂", "👍🏽",
        "emoji 🎉 party", "tab\tseparated\tvalues", "line1\nline2\n\nline4", "win\r\nline",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What shape is the red object?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "text<|endoftext|>more", "<|image_pad|><|image_pad|>", "a<|im_end|>b", "<|im_start|> spaced <|im_end|>",
        "USER: <image>\nWhat is this? ASSISTANT:", "<s>bos inside", "</s>", "<image>", "x<image>y", "<unk>",
        "def f(x):\n    return x * 2\n", "if (a && b) { c++; }", "https://example.com/path?q=1&r=2",
        "email@example.com", "$100.00", "50%", "#hashtag", "@mention", "...", "!!!", "?!", "—", "–", "…",
        "\"quoted\"", "'single'", "(parens)", "[brackets]", "{braces}", "a\u00a0b", "\u200b", "x\u3000y",
        "MiXeD CaSe", "ALLCAPS", "snake_case_name", "camelCaseName", "kebab-case-name", "123abc", "abc123",
        "1 2 3 4 5 6 7 8 9 10", "0.5x", "2nd 3rd 4th", "Monday", "january", "How many letters are in the word march?",
    ]
    rng = random.Random(1234)
    pool = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     \n\t.,;:!?'\"-_()[]{}<>/\\|@#$%^&*+=~`") + \
        ["é", "ü", "ß", "ñ", "東", "京", "я", "ж", "🙂", "\u0301", "\r", "’", "“", "”"] + \
        ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "'s", "'ll", " the", " and"]
    words = "the a an of to in is was red green blue circle square triangle star diamond large small top left right".split()
    for i in range(240):
        if i % 3 == 0:
            s.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
        else:
            s.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
    return s


def tokenizer_cases(tok, strings):
    out = {"strings": strings, "ids": [], "ids_with_special": [], "decoded": [], "decoded_skip_special": []}
    for t in strings:
        ids = tok.encode(t, add_special_tokens=False).ids
        out["ids"].append(ids)
        out["ids_with_special"].append(tok.encode(t, add_special_tokens=True).ids)
        out["decoded"].append(tok.decode(ids, skip_special_tokens=False))
        out["decoded_skip_special"].append(tok.decode(ids, skip_special_tokens=True))
    return out


def corpus_lines():
    rng = random.Random(7)
    words = ("the quick brown fox jumps over lazy dog red green blue yellow purple black white circle square "
             "triangle diamond star large small top bottom left right center how many what where is are there "
             "color shape objects image describe answer question number one two three four five six seven "
             "café naïve Straße Ångström 東京 世界 Привет мир привет hello world I'm you're don't it's we'll "
             "monday tuesday january february march 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 def return if else "
             "function value == != <= >= += ( ) [ ] { } ; : , . ! ? - _ / \\ @ # $ % & *").split()
    lines = []
    for _ in range(6000):
        n = rng.randint(3, 18)
        line = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.2:
            line += "\n" + " " * rng.randint(0, 4) + rng.choice(words)
        if rng.random() < 0.1:
            line = line.replace(" ", "  ", 1)
        lines.append(line)
    return lines


def make_tokenizers(out_dir):
    from tokenizers import Tokenizer, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    strings = test_strings()
    made = {}

    # 1. the bundled model's own tokenizer
    d = os.path.join(out_dir, "tokenizer", "qwen2vl-shapes")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(SHAPES_MODEL, "tokenizer.json"), d)
    made["qwen2vl-shapes"] = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))

    # 2. a Qwen2-style byte-level BPE with the NFC normaliser of real Qwen2 tokenizers, bigger vocab
    qwen_special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=qwen_special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    d = os.path.join(out_dir, "tokenizer", "qwen2-nfc")
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    made["qwen2-nfc"] = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))

    # 3. Llama/SentencePiece-style BPE with byte fallback: train, then put <unk>,<s>,</s>,<0x00>..<0xFF> first
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=80,
                                  show_progress=False)
    base.train_from_iterator([l.replace("\n", " ") for l in corpus_lines()[:3000]], trainer)
    j = json.loads(base.to_str())
    trained = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for piece, _ in trained:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = j["model"]["merges"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in merges]

    def llama_json(form):
        spec = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [
                {"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True},
                {"id": 1, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True},
                {"id": 2, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True},
                {"id": len(vocab), "content": "<image>", "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True},
                {"id": len(vocab) + 1, "content": "<pad>", "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": True},
            ],
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": merges},
        }
        seq_decoder = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
        if form == "legacy":
            spec["normalizer"] = {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
            spec["pre_tokenizer"] = None
            spec["decoder"] = seq_decoder
        else:  # metaspace-first / metaspace-always
            scheme = form.split("-")[1]
            spec["normalizer"] = None
            spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme,
                                     "split": False}
            spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False}
        return spec

    for form in ["legacy", "metaspace-first", "metaspace-always"]:
        name = "llama-" + form
        d = os.path.join(out_dir, "tokenizer", name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            json.dump(llama_json(form), f, ensure_ascii=False)
        made[name] = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))

    # 4. what transformers 5's LlamaTokenizer itself writes for the same vocab and merges, if it can build one
    try:
        from transformers import LlamaTokenizer
        t5 = LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in merges])
        d5 = os.path.join(out_dir, "tokenizer", "llama-transformers5")
        t5.save_pretrained(d5 + ".tmp")
        os.makedirs(d5, exist_ok=True)
        shutil.copy(os.path.join(d5 + ".tmp", "tokenizer.json"), d5)
        shutil.rmtree(d5 + ".tmp")
        made["llama-transformers5"] = Tokenizer.from_file(os.path.join(d5, "tokenizer.json"))
    except Exception as e:  # record why, keep the rest
        log("llama-transformers5 tokenizer skipped:", repr(e))

    for name, tok in made.items():
        with open(os.path.join(out_dir, "tokenizer", name, "cases.json"), "w") as f:
            json.dump(tokenizer_cases(tok, strings), f, ensure_ascii=False)
        log("tokenizer", name, "vocab", tok.get_vocab_size())


# ----------------------------------------------------------------------------------------------
# Images and preprocessing
# ----------------------------------------------------------------------------------------------
def synthetic_image(w, h, seed, mode="RGB"):
    """Smooth gradients plus a few hard-edged shapes and mild noise, so resizing is exercised."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([
        128 + 100 * np.sin(xx / (7 + seed % 5) + seed),
        128 + 100 * np.cos(yy / (9 + seed % 3)),
        (xx + yy) * 255.0 / (w + h)], axis=-1)
    arr += rng.normal(0, 6, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(3, max(4, w // 2))), y0 + int(rng.integers(3, max(4, h // 2)))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    if mode != "RGB":
        img = img.convert(mode)
    return img


PREPROCESS_IMAGES = [
    # name, width, height, format, PIL mode
    ("square224", 224, 224, "png", "RGB"),
    ("odd70x100", 100, 70, "png", "RGB"),       # 70/28 = 2.5 rounds to even
    ("wide300x200", 300, 200, "png", "RGB"),
    ("big640x480", 640, 480, "jpg", "RGB"),     # exceeds max_pixels of 'wide'
    ("small28x60", 60, 28, "png", "RGB"),       # below min_pixels
    ("grey90x90", 90, 90, "png", "L"),
    ("rgba150x120", 150, 120, "png", "RGBA"),
    ("photo333x250", 333, 250, "jpg", "RGB"),
    ("palette64x80", 64, 80, "png", "P"),
]


def qwen_preprocessor_config(min_pixels, max_pixels, layout):
    cfg = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "patch_size": 14, "resample": 3,
        "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2,
    }
    if layout == "size":
        cfg["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    else:
        cfg["min_pixels"] = min_pixels
        cfg["max_pixels"] = max_pixels
    return cfg


def make_preprocess(out_dir):
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPImageProcessor
    d = os.path.join(out_dir, "preprocess")
    os.makedirs(d, exist_ok=True)
    configs = {
        "shapes": json.load(open(os.path.join(SHAPES_MODEL, "preprocessor_config.json"))),
        "wide": qwen_preprocessor_config(56 * 56, 65536, "legacy"),
    }
    clip_cfg = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"shortest_edge": 224}}
    for name, cfg in configs.items():
        with open(os.path.join(d, f"{name}_preprocessor_config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    with open(os.path.join(d, "clip_preprocessor_config.json"), "w") as f:
        json.dump(clip_cfg, f, indent=1)

    # References are stored as the processor's resized 8-bit image (PNG, lossless): pixel_values are
    # normalise(uint8 image), so inverting the normalisation recovers it; `max_frac` records how far the
    # inverted values were from integers (0 up to float error when the processor resizes in uint8).
    # Raw float pixel_values are kept for two small cases to check normalisation and patch order exactly.
    tensors, cases, backends = {}, [], {}
    ref_dir = os.path.join(d, "ref")
    os.makedirs(ref_dir, exist_ok=True)
    keep_raw = {"wide.odd70x100", "clip.grey90x90"}

    def record(key, pv, mean, std, rescale, grid, file, pname, pil_pv=None, pil_grid=None):
        img = unnormalise(pv, mean, std, rescale, grid)
        rounded = img.round().clamp(0, 255)
        frac = float((img - rounded).abs().max())
        Image.fromarray(rounded.permute(1, 2, 0).to(torch.uint8).numpy(), "RGB").save(
            os.path.join(ref_dir, key + ".png"))
        case = {"name": key, "file": os.path.basename(file), "processor": pname, "max_frac": frac,
                "resized": list(img.shape[-2:])}
        if grid is not None:
            case["grid_thw"] = grid
        if pil_pv is not None and (pil_grid == grid):
            pil_img = unnormalise(pil_pv, mean, std, rescale, pil_grid)
            case["max_grey_diff_vs_pil_backend"] = float((pil_img - img).abs().max())
        if key in keep_raw:
            tensors[key] = pv.float()
        cases.append(case)

    for i, (name, w, h, fmt, mode) in enumerate(PREPROCESS_IMAGES):
        img = synthetic_image(w, h, seed=i + 1, mode=mode)
        path = os.path.join(d, f"{name}.{fmt}")
        if fmt == "jpg":
            img.save(path, quality=90)
        else:
            img.save(path)
        loaded = Image.open(path)
        for pname, cfg in list(configs.items()) + [("clip", clip_cfg)]:
            tmp = _write_tmp(d, pname, cfg)
            outs = {}
            for backend in ["torchvision", "pil"]:
                try:
                    proc = AutoImageProcessor.from_pretrained(tmp, backend=backend)
                except Exception as e:
                    try:
                        proc = AutoImageProcessor.from_pretrained(tmp, use_fast=(backend == "torchvision"))
                    except Exception as e2:
                        log("processor", pname, backend, "unavailable:", repr(e2))
                        continue
                backends[pname + "." + backend] = type(proc).__name__
                res = proc(images=[loaded], return_tensors="pt")
                grid = res["image_grid_thw"][0].tolist() if "image_grid_thw" in res else None
                outs[backend] = (res["pixel_values"] if grid is not None else res["pixel_values"][0], grid)
            shutil.rmtree(tmp)
            pv, grid = outs["torchvision"]
            pil_pv, pil_grid = outs.get("pil", (None, None))
            record(f"{pname}.{name}", pv, cfg["image_mean"], cfg["image_std"], cfg["rescale_factor"], grid,
                   path, pname, pil_pv, pil_grid)
    save_tensors(os.path.join(d, "pixel_values.safetensors"), tensors)
    with open(os.path.join(d, "cases.json"), "w") as f:
        json.dump({"backend": backends, "cases": cases}, f, indent=1)
    log("preprocess:", len(cases), "cases, backends", backends)
    log("max_frac", max(c["max_frac"] for c in cases), "max diff vs pil",
        max(c.get("max_grey_diff_vs_pil_backend", 0) for c in cases))


def unnormalise(pv, mean, std, rescale, grid):
    """pixel_values -> the [3, H, W] image in grey levels (float). Qwen: [N, C*tps*ps*ps] patches."""
    pv = pv.double()
    if grid is not None:
        t, gh, gw = grid
        c, tps, ps, m = 3, 2, 14, 2
        x = pv.reshape(t, gh // m, gw // m, m, m, c, tps, ps, ps).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
        pv = x.reshape(t * tps, c, gh * ps, gw * ps)[0]
    mean = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    return (pv * std + mean) / rescale


def _write_tmp(d, name, cfg):
    tmp = os.path.join(d, "_tmp_" + name)
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f)
    return tmp


# ----------------------------------------------------------------------------------------------
# Tiny random Qwen2-VL checkpoints and their outputs
# ----------------------------------------------------------------------------------------------
def tiny_qwen2vl_config():
    from transformers import Qwen2VLConfig
    text = dict(vocab_size=523, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                tie_word_embeddings=False, initializer_range=0.08, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="quick_gelu",
                  initializer_range=0.08)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=5, video_token_id=6,
                        vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=False)
    return cfg


def perturb_(model, seed):
    """Random init leaves norms at 1 and biases at 0; move every parameter so loading each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if ("norm" in name or "ln_" in name) else 0.03))


def copy_text_assets(model_dir):
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        shutil.copy(os.path.join(SHAPES_MODEL, f), model_dir)


def canonical_hub_name(key):
    """In-memory name -> (part, rest): part is 'lm', 'visual' or 'lm_head'."""
    if key.startswith("lm_head."):
        return "lm_head", key
    if "visual." in key:
        return "visual", key.split("visual.", 1)[1]
    rest = key.split("language_model.", 1)[1] if "language_model." in key else key.split("model.", 1)[1]
    return "lm", rest


def write_legacy_layout(model, cfg, model_dir, dtype):
    """Flat Hub-style config (rope_scaling + rope_theta) and in-memory weight names
    (model.language_model.*, model.visual.*), one file, q/k/v biases removed (they are zero)."""
    os.makedirs(model_dir, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        part, rest = canonical_hub_name(k)
        if part == "lm" and rest.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            assert float(v.abs().max()) == 0.0
            continue
        name = {"lm_head": rest, "visual": "model.visual." + rest, "lm": "model.language_model." + rest}[part]
        tensors[name] = v.to(dtype)
    save_tensors(os.path.join(model_dir, "model.safetensors"), tensors)
    d = cfg.to_dict()
    text = d.pop("text_config")
    flat = {k: v for k, v in d.items() if k not in ("vision_config",)}
    for k, v in text.items():
        if k not in ("rope_parameters", "model_type", "architectures", "dtype", "torch_dtype"):
            flat.setdefault(k, v)
    rp = text.get("rope_parameters") or {}
    flat["rope_theta"] = rp.get("rope_theta", 1000000.0)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rp.get("mrope_section", [2, 3, 3])}
    flat["vision_config"] = d["vision_config"]
    flat["model_type"] = "qwen2_vl"
    flat["architectures"] = ["Qwen2VLForConditionalGeneration"]
    flat["torch_dtype"] = "bfloat16"
    flat.pop("dtype", None)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(flat, f, indent=1)


QUESTIONS = ["What color is the circle?", "How many objects are there?", "Describe the image.",
             "What is in the top left?", "What is 3 + 4?"]


def qwen_cases():
    """(case name, list of samples); a sample is (list of image names or [], question)."""
    return [
        ("single", [(["square224"], QUESTIONS[0])]),
        ("text", [([], QUESTIONS[4])]),
        ("multi", [(["wide300x200", "odd70x100"], "Compare the two images.")]),
        ("batch", [([], "How many letters are in the word march?"), (["square224"], QUESTIONS[1]),
                   (["small28x60", "photo333x250"], QUESTIONS[2])]),
    ]


def qwen_messages(images, question, mid_text=True):
    content = []
    for i, _ in enumerate(images):
        content.append({"type": "image"})
        if mid_text and len(images) > 1 and i == 0:
            content.append({"type": "text", "text": "and then"})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def case_inputs(processor, samples, images_dir):
    """Chat-template prompts and the processor's batch (left-padded) for one case's samples."""
    from PIL import Image
    texts, imgs = [], []
    for image_names, q in samples:
        texts.append(processor.apply_chat_template(qwen_messages(image_names, q), tokenize=False,
                                                   add_generation_prompt=True))
        imgs += [Image.open(os.path.join(images_dir, n + (".jpg" if "photo" in n or "big" in n else ".png")))
                 for n in image_names]
    kwargs = dict(text=texts, return_tensors="pt", padding=True)
    if imgs:
        kwargs["images"] = imgs
    return texts, imgs, processor(**kwargs)


def run_qwen_cases(model, processor, model_dir, out_prefix, images_dir):
    from PIL import Image
    processor.tokenizer.padding_side = "left"
    tensors, meta = {}, {"model": os.path.basename(model_dir), "cases": []}
    for cname, samples in qwen_cases():
        texts, imgs, inputs = case_inputs(processor, samples, images_dir)
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, return_dict=True)
            gen = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        try:
            pos, deltas = model.model.get_rope_index(input_ids=inputs["input_ids"],
                                                     image_grid_thw=inputs.get("image_grid_thw"),
                                                     attention_mask=inputs["attention_mask"])
            tensors[f"{cname}.position_ids"] = pos
        except Exception as e:
            log("get_rope_index failed:", repr(e))
        tensors[f"{cname}.input_ids"] = inputs["input_ids"]
        tensors[f"{cname}.attention_mask"] = inputs["attention_mask"]
        if imgs:
            tensors[f"{cname}.pixel_values"] = inputs["pixel_values"].float()
            tensors[f"{cname}.image_grid_thw"] = inputs["image_grid_thw"]
            with torch.no_grad():
                try:
                    ve = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                    if isinstance(ve, (tuple, list)):
                        ve = torch.cat(list(ve), 0)
                    elif hasattr(ve, "pooler_output") and ve.pooler_output is not None:
                        ve = ve.pooler_output
                        ve = torch.cat(list(ve), 0) if isinstance(ve, (tuple, list)) else ve
                    tensors[f"{cname}.image_embeds"] = ve.float()
                except Exception as e:
                    log("get_image_features failed:", repr(e))
        tensors[f"{cname}.logits"] = out.logits.float()
        tensors[f"{cname}.hidden_states"] = torch.stack([h.float() for h in out.hidden_states])
        tensors[f"{cname}.generated"] = gen[:, inputs["input_ids"].shape[1]:]
        meta["cases"].append({"name": cname, "prompts": texts,
                              "images": [[n for n in s[0]] for s in samples],
                              "questions": [s[1] for s in samples],
                              "n_hidden_states": len(out.hidden_states)})
    save_tensors(out_prefix + ".safetensors", tensors)
    with open(out_prefix + ".cases.json", "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


def make_qwen2vl(out_dir):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
    d = os.path.join(out_dir, "qwen2vl")
    os.makedirs(d, exist_ok=True)
    images_dir = os.path.join(out_dir, "preprocess")
    torch.manual_seed(0)
    cfg = tiny_qwen2vl_config()

    # A: transformers 5 layout, as save_pretrained writes it (nested config, sharded, float32), with biases
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    perturb_(model, 1)
    a_dir = os.path.join(d, "tiny-a")
    model.save_pretrained(a_dir, max_shard_size="300KB")
    copy_text_assets(a_dir)
    with open(os.path.join(a_dir, "preprocessor_config.json"), "w") as f:
        json.dump(qwen_preprocessor_config(56 * 56, 12544, "size"), f, indent=1)
    model = Qwen2VLForConditionalGeneration.from_pretrained(a_dir, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(a_dir)
    run_qwen_cases(model, processor, a_dir, os.path.join(d, "tiny-a"), images_dir)
    log("qwen2vl tiny-a done; processor", type(processor.image_processor).__name__)

    # B: flat Hub config with rope_scaling, in-memory names, bf16 weights, no q/k/v biases
    torch.manual_seed(1)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    perturb_(model, 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and "visual" not in name:
                p.zero_()
            p.copy_(p.to(torch.bfloat16).float())
    b_dir = os.path.join(d, "tiny-b")
    write_legacy_layout(model, cfg, b_dir, torch.bfloat16)
    copy_text_assets(b_dir)
    with open(os.path.join(b_dir, "preprocessor_config.json"), "w") as f:
        json.dump(qwen_preprocessor_config(56 * 56, 12544, "legacy"), f, indent=1)
    model.set_attn_implementation("eager") if hasattr(model, "set_attn_implementation") else None
    processor = AutoProcessor.from_pretrained(b_dir)
    run_qwen_cases(model, processor, b_dir, os.path.join(d, "tiny-b"), images_dir)
    log("qwen2vl tiny-b done")


# ----------------------------------------------------------------------------------------------
# Tiny random LLaVA-1.5 checkpoints (CLIP ViT + projector + Llama) and their outputs
# ----------------------------------------------------------------------------------------------
# llava-hf/llava-1.5-7b-hf's chat template.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% "
    "endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ "
    "content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif "
    "%}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

LLAVA_VARIANTS = {
    # name: tokenizer fixture, KV heads, image size, vision_feature_layer, select strategy, layout, rope_theta
    "llava-mha": dict(tok="llama-legacy", kv=4, image=56, layer=-2, strategy="default", layout="save_pretrained",
                      theta=10000.0),
    "llava-gqa": dict(tok="llama-transformers5", kv=2, image=42, layer=[-3, -1], strategy="full",
                      layout="hub-legacy", theta=500000.0),
}


def llava_hub_name(key):
    """In-memory name -> the Hub's legacy llava layout."""
    for a, b in [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")]:
        if key.startswith(a):
            key = b + key[len(a):]
            break
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def llava_tokenizer(kind, tokenizer_dir):
    """(tokenizer, bos id, eos id) for the LLaVA checkpoints: "llama3" (byte-level, Llama-3 headers,
    see llama3_style_tokenizer) or the name of a Llama tokenizer fixture under tokenizer_dir, with
    <image> and <pad> added where it lacks them (transformers 5's LlamaTokenizer wrote neither)."""
    from transformers import PreTrainedTokenizerFast
    if kind == "llama3":
        tok = PreTrainedTokenizerFast(tokenizer_object=llama3_style_tokenizer(), bos_token="<|begin_of_text|>",
                                      eos_token="<|eot_id|>", pad_token="<pad>")
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        return tok, tok.convert_tokens_to_ids("<|begin_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, kind, "tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    missing = [t for t in ["<image>", "<pad>"] if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
        tok.pad_token = "<pad>"
    return tok, 1, 2


def run_llava_cases(model, processor, name, out_prefix, images_dir, image_id):
    """The cases of a LLaVA or LLaVA-NeXT checkpoint through transformers: ids, pixel values (and
    LLaVA-NeXT's image_sizes), image features (packed for LLaVA-NeXT), logits, hidden states, greedy
    tokens; written to out_prefix + .safetensors / .cases.json."""
    processor.tokenizer.padding_side = "left"
    tensors, meta = {}, {"model": name, "cases": [], "processor": type(processor).__name__,
                         "image_processor": type(processor.image_processor).__name__,
                         "tokenizer": type(processor.tokenizer).__name__}
    for cname, samples in qwen_cases():
        texts, imgs, inputs = case_inputs(processor, samples, images_dir)
        mask = inputs["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            out = model(**inputs, position_ids=pos, output_hidden_states=True, return_dict=True)
            gen = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        tensors[f"{cname}.input_ids"] = inputs["input_ids"]
        tensors[f"{cname}.attention_mask"] = mask
        if imgs:
            tensors[f"{cname}.pixel_values"] = inputs["pixel_values"].float()
            anyres = "image_sizes" in inputs
            if anyres:
                tensors[f"{cname}.image_sizes"] = inputs["image_sizes"]
            try:
                kw = {"image_sizes": inputs["image_sizes"]} if anyres else {}
                with torch.no_grad():
                    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], **kw)
                if hasattr(feats, "pooler_output"):
                    feats = feats.pooler_output
                feats = list(feats) if isinstance(feats, (list, tuple)) else [feats]
                if anyres and feats[0].dim() == 3:  # per-image tiles, not yet packed
                    feats, _ = model.model.pack_image_features(feats, inputs["image_sizes"], "default",
                                                               image_newline=model.model.image_newline)
                    feats = [feats]
                tensors[f"{cname}.image_embeds"] = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).float()
            except Exception as e:
                log("image features failed:", repr(e))
        tensors[f"{cname}.logits"] = out.logits.float()
        tensors[f"{cname}.hidden_states"] = torch.stack([h.float() for h in out.hidden_states])
        tensors[f"{cname}.generated"] = gen[:, inputs["input_ids"].shape[1]:]
        meta["cases"].append({"name": cname, "prompts": texts, "images": [list(s[0]) for s in samples],
                              "questions": [s[1] for s in samples], "n_hidden_states": len(out.hidden_states),
                              "image_tokens": int((inputs["input_ids"] == image_id).sum())})
    save_tensors(out_prefix + ".safetensors", tensors)
    with open(out_prefix + ".cases.json", "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    log(name, "done:", meta["processor"], meta["image_processor"], meta["tokenizer"])


def make_llava(out_dir):
    from transformers import (AutoProcessor, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    d = os.path.join(out_dir, "llava")
    os.makedirs(d, exist_ok=True)
    images_dir = os.path.join(out_dir, "preprocess")
    for vi, (name, v) in enumerate(LLAVA_VARIANTS.items()):
        torch.manual_seed(10 + vi)
        tok, bos, eos = llava_tokenizer(v["tok"], os.path.join(out_dir, "tokenizer"))
        image_id = tok.convert_tokens_to_ids("<image>")
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                  image_size=v["image"], patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                  projection_dim=32, initializer_range=0.08)
        text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=v["kv"], rms_norm_eps=1e-5,
                           max_position_embeddings=512, rope_theta=v["theta"], bos_token_id=bos, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id, initializer_range=0.08, tie_word_embeddings=False)
        try:
            text.rope_parameters = {"rope_type": "default", "rope_theta": v["theta"]}
        except Exception:
            pass
        n_patches = (v["image"] // 14) ** 2
        seq = n_patches + (1 if v["strategy"] == "full" else 0)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                          vision_feature_layer=v["layer"], vision_feature_select_strategy=v["strategy"],
                          projector_hidden_act="gelu", image_seq_length=seq, tie_word_embeddings=False)
        model = LlavaForConditionalGeneration(cfg).eval()
        perturb_(model, 20 + vi)
        mdir = os.path.join(d, name)
        if v["layout"] == "save_pretrained":
            model.save_pretrained(mdir)
        else:
            os.makedirs(mdir, exist_ok=True)
            save_tensors(os.path.join(mdir, "model.safetensors"),
                         {llava_hub_name(k): t for k, t in model.state_dict().items()})
            with open(os.path.join(mdir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
        ip = CLIPImageProcessor(size={"shortest_edge": v["image"]}, crop_size={"height": v["image"], "width": v["image"]},
                                do_center_crop=True, resample=3)
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy=v["strategy"], chat_template=LLAVA_TEMPLATE,
                              num_additional_image_tokens=1, image_token="<image>")
        proc.save_pretrained(mdir)
        with open(os.path.join(mdir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}, f)
        model = LlavaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(mdir)
        log(name, "files", sorted(os.listdir(mdir)), "image token", image_id, "tokens/image", seq)
        run_llava_cases(model, processor, name, os.path.join(d, name), images_dir, image_id)


# ----------------------------------------------------------------------------------------------
# Tiny random LLaVA-NeXT checkpoints (anyres tiles + image_newline; Llama-3 and Mistral text)
# ----------------------------------------------------------------------------------------------
# Templates in the form of llava-hf's llama3-llava-next-8b-hf / llava-v1.6-mistral-7b-hf prompts.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{{ '[/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + content['text'] + '</s>' }}"
    "{% endfor %}{% endif %}{% endfor %}")
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_style_tokenizer():
    """The shapes model's byte-level BPE with Llama-3's pre-tokenizer regex, its header tokens and a
    post-processor that prepends <|begin_of_text|>, as Meta-Llama-3's tokenizer.json does."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    tok = Tokenizer.from_file(os.path.join(SHAPES_MODEL, "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<image>", "<pad>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                            special_tokens=[("<|begin_of_text|>", bos)])
    return tok


LLAVA_NEXT_VARIANTS = {
    "llava-next-llama3": dict(text="llama", theta=500000.0, template=LLAMA3_TEMPLATE),
    "llava-next-mistral": dict(text="mistral", theta=1000000.0, template=MISTRAL_TEMPLATE),
}
LLAVA_NEXT_TILE = 42
LLAVA_NEXT_PINPOINTS = [[42, 84], [84, 42], [84, 84], [42, 126], [126, 42]]


def make_llava_next(out_dir):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, MistralConfig)
    try:
        from transformers import LlavaNextImageProcessor as ImageProcessor  # PIL backend, like the CLIP fixtures
    except ImportError:
        from transformers import LlavaNextImageProcessorFast as ImageProcessor
    d = os.path.join(out_dir, "llava_next")
    os.makedirs(d, exist_ok=True)
    images_dir = os.path.join(out_dir, "preprocess")
    if not os.path.isdir(images_dir):
        images_dir = os.path.join(ROOT, "tests", "fixtures", "preprocess")
    S = LLAVA_NEXT_TILE
    for vi, (name, v) in enumerate(LLAVA_NEXT_VARIANTS.items()):
        torch.manual_seed(40 + vi)
        tok, bos, eos = llava_tokenizer("llama3" if v["text"] == "llama" else "llama-legacy",
                                        os.path.join(ROOT, "tests", "fixtures", "tokenizer"))
        image_id = tok.convert_tokens_to_ids("<image>")
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                  image_size=S, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                  projection_dim=32, initializer_range=0.08)
        tk = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024,
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=tok.pad_token_id, initializer_range=0.08,
                  tie_word_embeddings=False)
        text = LlamaConfig(**tk) if v["text"] == "llama" else MistralConfig(sliding_window=None, **tk)
        text.rope_parameters = {"rope_type": "default", "rope_theta": v["theta"]}
        cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                              image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-2,
                              vision_feature_select_strategy="default", projector_hidden_act="gelu",
                              image_seq_length=(S // 14) ** 2, tie_word_embeddings=False)
        model = LlavaNextForConditionalGeneration(cfg).eval()
        perturb_(model, 50 + vi)
        mdir = os.path.join(d, name)
        model.save_pretrained(mdir)
        ip = ImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, do_center_crop=True, resample=3, do_pad=True)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default", chat_template=v["template"],
                                  num_additional_image_tokens=1, image_token="<image>")
        proc.save_pretrained(mdir)
        with open(os.path.join(mdir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}, f)
        model = LlavaNextForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager",
                                                                  dtype=torch.float32).eval()
        log(name, "files", sorted(os.listdir(mdir)), "image token", image_id)
        run_llava_cases(model, proc, name, os.path.join(d, name), images_dir, image_id)


# ----------------------------------------------------------------------------------------------
# A tiny random Qwen2.5-VL checkpoint (RMSNorm + SwiGLU vision tower, window attention)
# ----------------------------------------------------------------------------------------------
def make_qwen25vl(out_dir):
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    d = os.path.join(out_dir, "qwen25vl")
    os.makedirs(d, exist_ok=True)
    images_dir = os.path.join(out_dir, "preprocess")
    if not os.path.isdir(images_dir):
        images_dir = os.path.join(ROOT, "tests", "fixtures", "preprocess")
    torch.manual_seed(60)
    text = dict(vocab_size=523, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                tie_word_embeddings=False, initializer_range=0.08, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    # window_size 56: 56/14/2 = 2 merged tokens (4x4 patches) per window side, so the fixture images'
    # grids (4..16 patches a side) get full and partial windows.
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="silu",
                  window_size=56, fullatt_block_indexes=[1, 3], initializer_range=0.08)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=5, video_token_id=6,
                           vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    perturb_(model, 61)
    mdir = os.path.join(d, "tiny")
    model.save_pretrained(mdir, max_shard_size="300KB")
    copy_text_assets(mdir)
    pc = qwen_preprocessor_config(56 * 56, 12544, "size")
    pc["processor_class"] = "Qwen2_5_VLProcessor"
    with open(os.path.join(mdir, "preprocessor_config.json"), "w") as f:
        json.dump(pc, f, indent=1)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(mdir)
    run_qwen_cases(model, processor, mdir, os.path.join(d, "tiny"), images_dir)
    # transformers 5.17's get_rope_index needs the processor's mm_token_type_ids (run_qwen_cases' call
    # without them fails): the 3-D positions and rope deltas go to their own file.
    processor.tokenizer.padding_side = "left"
    pos = {}
    for cname, samples in qwen_cases():
        _, _, inputs = case_inputs(processor, samples, images_dir)
        p, deltas = model.model.get_rope_index(input_ids=inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                                               attention_mask=inputs["attention_mask"],
                                               mm_token_type_ids=inputs.get("mm_token_type_ids"))
        pos.update({f"{cname}.input_ids": inputs["input_ids"], f"{cname}.attention_mask": inputs["attention_mask"],
                    f"{cname}.position_ids": p, f"{cname}.rope_deltas": deltas})
    save_tensors(os.path.join(d, "tiny.positions.safetensors"), pos)
    log("qwen25vl tiny done; processor", type(processor).__name__, type(processor.image_processor).__name__)


# ----------------------------------------------------------------------------------------------
# The bundled qwen2vl-shapes model
# ----------------------------------------------------------------------------------------------
def shapes_rows(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def shapes_messages(row):
    q = row["conversations"][0]["value"]
    content = []
    if q.startswith("<image>\n"):
        content.append({"type": "image"})
        q = q[len("<image>\n"):]
    content.append({"type": "text", "text": q})
    return [{"role": "user", "content": content}]


def make_shapes(out_dir, data_dir, device):
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
    d = os.path.join(out_dir, "shapes")
    os.makedirs(d, exist_ok=True)
    processor = AutoProcessor.from_pretrained(SHAPES_MODEL)
    processor.tokenizer.padding_side = "left"
    rows = shapes_rows(os.path.join(data_dir, "eval.jsonl"))

    def batch_inputs(rs):
        texts = [processor.apply_chat_template(shapes_messages(r), tokenize=False, add_generation_prompt=True)
                 for r in rs]
        imgs = [Image.open(os.path.join(data_dir, r["image"])).convert("RGB") for r in rs if "image" in r]
        kw = dict(text=texts, return_tensors="pt", padding=True)
        if imgs:
            kw["images"] = imgs
        return texts, processor(**kw)

    # logits for a batch of 4 (image and text rows mixed) on the CPU in float32
    model = Qwen2VLForConditionalGeneration.from_pretrained(SHAPES_MODEL, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    pick = [r for r in rows if "image" in r][:2] + [r for r in rows if "image" not in r][:2]
    texts, inputs = batch_inputs(pick)
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    save_tensors(os.path.join(d, "batch.safetensors"), {
        "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
        "pixel_values": inputs["pixel_values"].float(), "image_grid_thw": inputs["image_grid_thw"],
        "logits": out.logits.float()})
    with open(os.path.join(d, "batch.json"), "w") as f:
        json.dump({"ids": [r["id"] for r in pick], "prompts": texts}, f, indent=1)

    # greedy answers of every eval row, float32 with TF32 off, on the GPU when there is one
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.to(device)
    answers, t0 = {}, time.time()
    for i in range(0, len(rows), 50):
        rs = rows[i:i + 50]
        _, inputs = batch_inputs(rs)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        for r, g in zip(rs, gen[:, inputs["input_ids"].shape[1]:]):
            answers[r["id"]] = processor.tokenizer.decode(g, skip_special_tokens=True).strip()
    correct = sum(answers[r["id"]] == r["conversations"][1]["value"] for r in rows)
    with open(os.path.join(d, "eval_answers.json"), "w") as f:
        json.dump({"device": str(device), "accuracy": correct / len(rows), "answers": answers}, f, indent=0)
    log(f"shapes eval: accuracy {correct / len(rows):.3f} on {device} in {time.time() - t0:.0f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "shapes"), help="folder with eval.jsonl and images")
    ap.add_argument("--only", default="tokenizer,preprocess,qwen2vl,llava,llava_next,qwen25vl,shapes")
    args = ap.parse_args()
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    import transformers
    log("torch", torch.__version__, "transformers", transformers.__version__)
    parts = args.only.split(",")
    steps = [("tokenizer", lambda: make_tokenizers(args.out)), ("preprocess", lambda: make_preprocess(args.out)),
             ("qwen2vl", lambda: make_qwen2vl(args.out)), ("llava", lambda: make_llava(args.out)),
             ("llava_next", lambda: make_llava_next(args.out)), ("qwen25vl", lambda: make_qwen25vl(args.out)),
             ("shapes", lambda: make_shapes(args.out, args.data, "cuda" if torch.cuda.is_available() else "cpu"))]
    failed = []
    for name, fn in steps:
        if name in parts:
            try:
                fn()
            except Exception:
                import traceback
                traceback.print_exc()
                failed.append(name)
    if failed:
        log("FAILED:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
