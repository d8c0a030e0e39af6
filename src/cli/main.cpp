// mlaforge: convert vision-language models to Multi-head Latent Attention and serve them.
// This file only parses arguments and prints; the work lives in the library.
#include <ATen/ATen.h>

#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "convert/convert.h"
#include "core/device.h"
#include "core/error.h"
#include "core/threads.h"
#include "eval/eval.h"
#include "infer/bench.h"
#include "infer/generate.h"
#include "infer/latent_pool.h"
#include "io/dataset.h"
#include "train/finetune.h"
#include "model/vlm.h"

using namespace mlaforge;

namespace {

std::string human_count(int64_t n) {
  char buf[32];
  if (n >= 1000000000)
    std::snprintf(buf, sizeof buf, "%.2fB", double(n) / 1e9);
  else if (n >= 1000000)
    std::snprintf(buf, sizeof buf, "%.2fM", double(n) / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%lld", (long long)n);
  return buf;
}

const char* kDtypeHelp =
    "Decoder weights and activations: auto (on cuda a bf16/f16 checkpoint stays bf16/f16, else f32), f32, bf16";

// --device: where the model runs; --dtype: its weights and activations (auto: a bf16 or f16
// checkpoint stays in it on cuda, float32 on the CPU).
std::unique_ptr<Vlm> load_on(const std::string& dir, const std::string& device, const std::string& dtype = "auto") {
  LoadOptions lo;
  lo.device = parse_device(device);
  // auto here: a bf16 or f16 checkpoint stays as stored on cuda, anything else runs in float32.
  lo.dtype = dtype == "auto" ? at::kFloat : parse_dtype(dtype, lo.device);
  lo.stored_half = dtype == "auto" && lo.device.is_cuda();
  return Vlm::load(dir, lo);
}

int cmd_inspect(const std::string& model_dir) {
  auto m = Vlm::load(model_dir);
  const ModelConfig& c = m->config();
  const TextConfig& t = c.text;
  std::printf("model           %s\n", model_dir.c_str());
  const std::string vision =
      c.qwen_vl()
          ? str(c.family == Family::Qwen25VL ? "Qwen2.5-VL" : "Qwen2-VL", " ViT depth ", c.vision.depth, " width ",
                c.vision.embed_dim,
                c.vision.windowed ? str(", windows of ", c.vision.window_size, " px, ",
                                        c.vision.fullatt_block_indexes.size(), " full-attention blocks")
                                  : std::string())
          : str("CLIP ViT ", c.clip.num_layers, " layers width ", c.clip.hidden_size, " at ", c.clip.image_size,
                " px, ", c.llava.tokens_per_image(c.clip), " tokens per ",
                c.llava.anyres() ? str("tile, anyres over ", c.llava.grid_pinpoints.size(), " grid pinpoints")
                                 : std::string("image"));
  std::printf("architecture    %s (vision: %s; decoder: %lld layers, hidden %lld)\n", c.model_type.c_str(),
              vision.c_str(), (long long)t.num_layers, (long long)t.hidden_size);
  std::printf("attention       %lld query heads, %lld KV heads (%s), head_dim %lld, %s\n", (long long)t.num_heads,
              (long long)t.num_kv_heads, t.num_heads == t.num_kv_heads ? "MHA" : "GQA", (long long)t.head_dim,
              t.mrope_section.empty() ? "1-D RoPE"
                                      : str("M-RoPE section [", t.mrope_section[0], ", ", t.mrope_section[1], ", ",
                                            t.mrope_section[2], "]").c_str());
  std::printf("parameters      %s total: vision %s, language model %s\n", human_count(m->parameter_count("all")).c_str(),
              human_count(m->parameter_count("vision")).c_str(), human_count(m->parameter_count("language")).c_str());
  const int64_t mha = c.mha_kv_bytes_per_token(2);
  if (!c.mla.enabled) {
    std::printf("KV cache        %lld bytes/token in bf16 (2 x %lld layers x %lld KV heads x %lld dims x 2 B)\n",
                (long long)mha, (long long)t.num_layers, (long long)t.num_kv_heads, (long long)t.head_dim);
    return 0;
  }
  const MlaConfig& a = c.mla;
  std::printf("MLA             %lld rotary pairs per KV head (%s), latent %lld per token and layer (%s, %s, %s)\n",
              (long long)a.rope_pairs, a.rope_strategy.c_str(), (long long)a.latent_dim, a.lowrank.c_str(),
              a.kv.c_str(), a.decoupled ? "decoupled" : "shared");
  const int64_t mla = c.kv_bytes_per_token(2);
  std::printf("KV cache        before %lld bytes/token in bf16 (2 x %lld layers x %lld KV heads x %lld dims x 2 B)\n",
              (long long)mha, (long long)t.num_layers, (long long)t.num_kv_heads, (long long)t.head_dim);
  std::printf("                after  %lld bytes/token in bf16 (%lld layers x (%lld rotary + %lld latent) x 2 B): "
              "%.1f%% of before, %.2fx fewer\n",
              (long long)mla, (long long)t.num_layers, (long long)(t.num_kv_heads * 2 * a.rope_pairs),
              (long long)a.latent_dim, 100.0 * double(mla) / double(mha), double(mha) / double(mla));
  if (a.latent_dim > 0) {
    // What the paged pool allocates per token (all layers; scales and the modality byte included).
    auto pool_bytes = [&](KvFormat latent, KvFormat rope) {
      LatentPoolOptions o;
      o.latent = latent;
      o.rope = rope;
      return LatentPool(t.num_layers, t.num_kv_heads, 2 * a.rope_pairs, a.latent_dim, 1, o, at::kCPU).bytes_per_token();
    };
    const double b16 = pool_bytes(KvFormat::BF16, KvFormat::BF16), i8 = pool_bytes(KvFormat::Int8, KvFormat::BF16),
                 i4 = pool_bytes(KvFormat::Int4, KvFormat::BF16), i4r8 = pool_bytes(KvFormat::Int4, KvFormat::Int8);
    std::printf("latent cache    bytes/token as allocated (scales, modality byte): bf16 %.0f, int8 %.0f, int4 %.0f, "
                "int4 + int8 rotary %.0f (%.2fx, %.2fx, %.2fx, %.2fx fewer than bf16 before)\n",
                b16, i8, i4, i4r8, double(mha) / b16, double(mha) / i8, double(mha) / i4, double(mha) / i4r8);
  }
  return 0;
}

// --kv-cache, --kv-rope, --kv-window and --no-cuda-graph, on every command that decodes.
void add_cache_options(CLI::App* cmd, CacheOptions& c) {
  cmd->add_option("--kv-cache", c.latent,
                  "KV cache storage: auto (the compute dtype), bf16, or for MLA checkpoints the latent in int8 or "
                  "int4 (per-token group scales)")
      ->check(CLI::IsMember({"auto", "f32", "bf16", "int8", "int4"}))
      ->capture_default_str();
  cmd->add_option("--kv-rope", c.rope, "MLA rotary keys: auto (bf16 when the latent is, or is quantized), f32, bf16, int8")
      ->check(CLI::IsMember({"auto", "f32", "bf16", "int8"}))
      ->capture_default_str();
  cmd->add_option("--kv-window", c.window,
                  "MLA latent cache: also keep the last N positions of every sequence unquantized, in the compute "
                  "dtype, and decode over them exactly (0: off)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_flag_function(
      "--no-cuda-graph", [&c](int64_t) { c.cuda_graph = false; },
      "On cuda, launch every decoding step's kernels one by one instead of replaying a CUDA graph captured per "
      "cache shape (slower: the step is then bound by the host's launches)");
}

int cmd_generate(const std::string& model_dir, const std::vector<std::string>& images, const std::string& prompt,
                 const SamplingOptions& so, const std::string& device, const std::string& dtype) {
  auto m = load_on(model_dir, device, dtype);
  Prompt p;
  p.turns.push_back(user_turn_from_text(prompt));
  p.image_paths = images;
  size_t markers = 0;
  for (auto& it : p.turns[0].items) markers += it.is_image;
  if (markers != images.size())
    throw Error(str("--prompt: ", markers, " <image> markers for ", images.size(), " --image files ",
                    "(each <image> takes the next --image)"));
  auto gens = generate(*m, {p}, so);
  std::printf("%s\n", gens[0].text.c_str());
  return 0;
}

int cmd_convert(const ConvertOptions& o) {
  ConvertReport r = convert_model(o);
  std::printf("converted %s -> %s\n", o.model_dir.c_str(), o.out_dir.c_str());
  std::printf("calibration: %lld samples (%lld text, %lld image tokens) in %.1f s; factorisation %.1f s; total %.1f s\n",
              (long long)r.calib_samples, (long long)r.calib_tokens[0], (long long)r.calib_tokens[1], r.calib_seconds,
              r.factor_seconds, r.total_seconds);
  std::printf("%-6s %-34s %12s %12s %9s %9s\n", "layer", "kept pairs (KV head 0)", "err image", "err text",
              "calib s", "factor s");
  for (size_t l = 0; l < r.layers.size(); ++l) {
    std::string kept;
    for (int64_t k : r.layers[l].kept[0]) kept += (kept.empty() ? "" : ",") + std::to_string(k);
    if (kept.size() > 34) kept = kept.substr(0, 31) + "...";
    std::printf("%-6zu %-34s %12.3e %12.3e %9.2f %9.2f\n", l, kept.c_str(), r.layers[l].rel_error_image,
                r.layers[l].rel_error_text, r.layers[l].calib_seconds, r.layers[l].factor_seconds);
  }
  std::printf("peak memory: host %.2f GiB resident", double(r.peak_host_bytes) / double(1 << 30));
  if (o.device == "cuda") std::printf(", GPU %.2f GiB allocated", double(r.peak_device_bytes) / double(1 << 30));
  std::printf("\n");
  std::printf("KV cache: %lld -> %lld bytes/token in bf16 (%.1f%% smaller); report: %s/conversion_report.json\n",
              (long long)r.kv_bytes_before, (long long)r.kv_bytes_after,
              100.0 * (1.0 - double(r.kv_bytes_after) / double(r.kv_bytes_before)), o.out_dir.c_str());
  return 0;
}

int cmd_eval(const std::string& model_dir, const std::string& data, int64_t limit, const EvalOptions& eo,
             const std::string& report_path, const std::string& reference_dir, const std::string& device,
             const std::string& dtype) {
  auto m = load_on(model_dir, device, dtype);
  auto rows = load_conversations(data, limit);
  if (rows.empty()) throw Error(data + ": no records");
  EvalReport rep = evaluate(*m, rows, eo);
  std::printf("accuracy %.4f on %lld questions in %.1f s\n", rep.accuracy, (long long)rep.n, rep.seconds);
  if (!reference_dir.empty()) {
    auto ref = load_on(reference_dir, device, dtype);
    KlReport kl = answer_kl(*m, *ref, rows, eo.batch_size, eo.cache);
    attach_kl(rep, kl);
    std::printf("KL(reference || model) %.5f per answer token over %lld positions (%.1f s)\n", kl.mean_kl,
                (long long)kl.positions, kl.seconds);
  }
  for (auto& [kind, s] : rep.by_kind)
    std::printf("  %-14s %.3f  (%lld/%lld)\n", kind.empty() ? "(none)" : kind.c_str(),
                double(s.correct) / double(s.total), (long long)s.correct, (long long)s.total);
  if (!report_path.empty()) {
    std::ofstream out(report_path);
    if (!out) throw Error(report_path + ": cannot write report");
    out << rep.to_json() << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // libgomp reads OMP_WAIT_POLICY when it loads, before main: its default spinning threads fight
  // OpenBLAS's for the cores and make small matmuls ~3x slower. Set it and restart once.
  if (!std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then carry on as we are
  }
  CLI::App app{"mlaforge: convert vision-language models (Qwen2-VL, Qwen2.5-VL, LLaVA) to Multi-head Latent Attention,\n"
               "recover accuracy with a short fine-tune, and serve them with a small KV cache."};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads (default: all cores)");

  auto* inspect = app.add_subcommand("inspect", "Show a model's architecture, parameter counts and KV-cache bytes per token");
  std::string inspect_model;
  inspect->add_option("model,--model", inspect_model, "Model directory (Hugging Face checkpoint), positional or --model")->required();

  auto* gen = app.add_subcommand("generate", "Answer one prompt; each <image> in the prompt takes the next --image");
  std::string gen_model, gen_prompt;
  std::vector<std::string> gen_images;
  SamplingOptions so;
  so.max_new_tokens = 128;
  gen->add_option("--model", gen_model, "Model directory")->required();
  gen->add_option("--image", gen_images, "Image file (PNG or JPEG); repeat for several");
  gen->add_option("--prompt", gen_prompt, "Prompt text, with <image> where each image goes")->required();
  gen->add_option("--max-new-tokens", so.max_new_tokens, "Most tokens to generate")->capture_default_str();
  gen->add_option("--temperature", so.temperature, "Sampling temperature; 0 is greedy")->capture_default_str();
  gen->add_option("--top-p", so.top_p, "Nucleus sampling mass (with temperature > 0)")->capture_default_str();
  gen->add_option("--seed", so.seed, "Random seed for sampling")->capture_default_str();
  std::string gen_device = "cpu", gen_dtype = "auto";
  gen->add_option("--dtype", gen_dtype, kDtypeHelp)->capture_default_str();
  gen->add_option("--device", gen_device, "cpu or cuda")
      ->capture_default_str();
  add_cache_options(gen, so.cache);

  auto* ev = app.add_subcommand("eval", "Exact-match accuracy of greedy answers on LLaVA-style JSONL questions");
  std::string ev_model, ev_data, ev_report;
  int64_t ev_limit = 0;
  EvalOptions eo;
  ev->add_option("--model", ev_model, "Model directory")->required();
  ev->add_option("--data", ev_data, "JSONL file; image paths are relative to its folder")->required();
  ev->add_option("--limit", ev_limit, "Evaluate only the first N rows");
  ev->add_option("--max-new-tokens", eo.max_new_tokens, "Most tokens per answer")->capture_default_str();
  ev->add_option("--batch", eo.batch_size, "Questions decoded together")->capture_default_str();
  ev->add_option("--report", ev_report, "Write {accuracy, n, by_kind, seconds, answers} as JSON here");
  std::string ev_reference, ev_device = "cpu", ev_dtype = "auto";
  ev->add_option("--dtype", ev_dtype, kDtypeHelp)->capture_default_str();
  ev->add_option("--device", ev_device, "cpu or cuda")
      ->capture_default_str();
  add_cache_options(ev, eo.cache);
  ev->add_option("--reference", ev_reference,
                 "Also measure the mean KL(reference || model) of the next-token distribution over answer tokens");

  auto* conv = app.add_subcommand(
      "convert", "Convert a model's attention to Multi-head Latent Attention (partial RoPE + low-rank latent KV)");
  ConvertOptions co;
  std::string rope_pairs = "all", dkv = "full", strategy = "adaptive", lowrank = "whitened", kv = "joint",
              modality = "decoupled";
  conv->add_option("--model", co.model_dir, "Original model directory")->required();
  conv->add_option("--out", co.out_dir, "Output directory for the converted checkpoint")->required();
  conv->add_option("--calib", co.calib_path, "Calibration data (LLaVA-style JSONL with images)")->required();
  conv->add_option("--rope-pairs", rope_pairs, "Rotary pairs kept per KV head, or \"all\"")->capture_default_str();
  conv->add_option("--dkv", dkv, "Latent width per KV head (latent = KV heads x dkv), or \"full\"")->capture_default_str();
  conv->add_option("--rope-strategy", strategy, "Which pairs keep rotation: high, low, uniform, 2norm, adaptive")
      ->capture_default_str();
  conv->add_option("--lowrank", lowrank, "whitened (minimises output error) or svd (parameter distance)")
      ->capture_default_str();
  conv->add_option("--kv", kv, "joint (one K/V latent) or split (separate K and V latents)")->capture_default_str();
  conv->add_option("--modality", modality, "decoupled (one down/up pair per modality) or shared")->capture_default_str();
  conv->add_option("--ridge", co.ridge,
                   "Whitened: factorise with S + ridge * mean(diag S) I (0: pure activation-aware; larger: towards svd)")
      ->capture_default_str();
  conv->add_option("--calib-samples", co.calib_samples, "Calibration conversations to use")->capture_default_str();
  conv->add_option("--batch", co.batch_size, "Calibration batch size")->capture_default_str();
  conv->add_option("--stats", co.stats_path, "Calibration statistics file: read if it exists, else written");
  conv->add_option("--device", co.device,
                   "cpu or cuda: where calibration and factorisation run (layers stream in one at a time)")
      ->capture_default_str();
  conv->add_option("--dtype", co.dtype, "Decoder weights and the new tensors: auto (f32 on cpu, bf16 on cuda), f32, bf16")
      ->capture_default_str();

  auto* bn = app.add_subcommand(
      "bench", "Prefill/decode speed, attention-kernel bandwidth and KV bytes: an MLA model against its original, "
               "same process, random weights of the checkpoint's configuration");
  BenchOptions bo;
  bn->add_option("--model", bo.model_dir, "Model directory (config.json is enough): an original, or a converted one")->required();
  bn->add_option("--context", bo.context, "Cached tokens per sequence")->capture_default_str();
  bn->add_option("--batch", bo.batch, "Sequences decoded together")->capture_default_str();
  bn->add_option("--decode-steps", bo.decode_steps, "Decoding steps timed")->capture_default_str();
  bn->add_option("--layers", bo.layers, "Only the first N decoder layers (quick runs of big models)");
  bn->add_option("--rope-pairs", bo.rope_pairs, "For an original: MLA rotary pairs per KV head (default head_dim/8)");
  bn->add_option("--dkv", bo.dkv, "For an original: MLA latent width per KV head (default head_dim/4)");
  bn->add_option("--prefill-chunk", bo.prefill_chunk, "Prefill chunk length")->capture_default_str();
  bn->add_option("--device", bo.device, "cpu or cuda")->capture_default_str();
  bn->add_option("--dtype", bo.dtype, "Weights and activations: auto (bf16 on cuda, f32 on cpu), f32, bf16")
      ->capture_default_str();
  bn->add_option("--report", bo.report, "Also write the numbers as JSON here");
  add_cache_options(bn, bo.cache);

  auto* ft = app.add_subcommand("finetune",
                                "Recover a converted model's accuracy: attention-only fine-tuning, optionally distilled");
  FinetuneOptions fo;
  ft->add_option("--model", fo.model_dir, "Converted model directory")->required();
  ft->add_option("--data", fo.data_path, "Training data (LLaVA-style JSONL)")->required();
  ft->add_option("--out", fo.out_dir, "Output directory: the fine-tuned model, logs, checkpoint")->required();
  ft->add_option("--teacher", fo.teacher_dir,
                 "Original model, for the distillation losses (ce+kl, ce+attn-mse, ce+kl+attn-mse)");
  ft->add_option("--stage", fo.stage, "1: partial RoPE only (a --dkv full conversion); 2: after the low-rank init")
      ->check(CLI::Range(1, 2));
  ft->add_option("--trainable", fo.trainable,
                 "attn, attn+norms, all-lm, or latent (the per-modality latent down/up projections alone)")
      ->capture_default_str();
  ft->add_option("--loss", fo.loss,
                 "ce, ce+kl (distil logits), ce+attn-mse (distil attention outputs) or ce+kl+attn-mse (both)")
      ->capture_default_str();
  ft->add_option("--kl-weight", fo.kl_weight, "Weight of the KL term")->capture_default_str();
  ft->add_option("--kl-positions", fo.kl_positions,
                 "Where ce+kl compares next-token distributions: answers, or text (every text token of prompt "
                 "and answer)")
      ->capture_default_str();
  ft->add_option("--mse-weight", fo.mse_weight, "Weight of the attention-output term")->capture_default_str();
  auto* ep = ft->add_option("--epochs", fo.epochs, "Passes over the data")->capture_default_str();
  ft->add_option("--steps", fo.steps, "Optimizer steps (instead of --epochs)")->excludes(ep);
  ft->add_option("--limit", fo.limit, "Use only the first N training rows");
  ft->add_option("--lr", fo.lr, "Peak learning rate (AdamW, linear warmup then cosine)")->capture_default_str();
  ft->add_option("--warmup", fo.warmup, "Warmup, as a fraction of the steps")->capture_default_str();
  ft->add_option("--weight-decay", fo.weight_decay, "AdamW weight decay")->capture_default_str();
  ft->add_option("--clip", fo.clip, "Gradient norm clipping (0: off)")->capture_default_str();
  ft->add_option("--batch", fo.batch, "Rows per micro-batch")->capture_default_str();
  ft->add_option("--grad-accum", fo.grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  ft->add_option("--eval", fo.eval_path, "Evaluate on this JSONL before, periodically and after");
  ft->add_option("--eval-every", fo.eval_every, "Steps between evaluations (0: only before and after)");
  ft->add_option("--eval-limit", fo.eval_limit, "Evaluate on the first N rows only");
  ft->add_flag("!--no-eval-before", fo.eval_before, "Skip the evaluation before training");
  ft->add_option("--save-every", fo.save_every, "Steps between checkpoints")->capture_default_str();
  ft->add_option("--resume", fo.resume_dir, "Resume from an earlier run's output directory");
  ft->add_option("--seed", fo.seed, "Data order seed")->capture_default_str();
  ft->add_option("--device", fo.device, "cpu or cuda")->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  try {
    set_threads(threads);
    if (*inspect) return cmd_inspect(inspect_model);
    if (*gen) return cmd_generate(gen_model, gen_images, gen_prompt, so, gen_device, gen_dtype);
    if (*ev) return cmd_eval(ev_model, ev_data, ev_limit, eo, ev_report, ev_reference, ev_device, ev_dtype);
    if (*bn) return run_bench(bo);
    if (*ft) {
      FinetuneResult r = finetune(fo);
      std::printf("fine-tuned %s -> %s: %lld steps, %lld trainable / %lld frozen decoder weights, final loss %.4f, "
                  "%.0f tokens/s, %.0f s\n",
                  fo.model_dir.c_str(), fo.out_dir.c_str(), (long long)r.steps, (long long)r.trainable_parameters,
                  (long long)r.frozen_parameters, r.final_loss, r.tokens_per_s, r.seconds);
      if (r.accuracy_before >= 0)
        std::printf("accuracy on %s: %.4f before, %.4f after\n", fo.eval_path.c_str(), r.accuracy_before,
                    r.accuracy_after);
      return 0;
    }
    if (*conv) {
      auto number_or = [](const std::string& v, const char* word, const char* opt) -> int64_t {
        if (v == word) return -1;
        try {
          size_t used = 0;
          long long n = std::stoll(v, &used);
          if (used == v.size() && n >= 0) return n;
        } catch (const std::exception&) {
        }
        throw Error(str(opt, ": expected a non-negative number or \"", word, "\", got \"", v, "\""));
      };
      co.rope_pairs = number_or(rope_pairs, "all", "--rope-pairs");
      co.dkv = number_or(dkv, "full", "--dkv");
      co.strategy = parse_rope_strategy(strategy);
      if (lowrank != "whitened" && lowrank != "svd") throw Error("--lowrank: choose whitened or svd");
      co.method = lowrank == "svd" ? LowRankMethod::Svd : LowRankMethod::Whitened;
      if (kv != "joint" && kv != "split") throw Error("--kv: choose joint or split");
      co.kv = kv == "split" ? KvLatent::Split : KvLatent::Joint;
      if (modality != "decoupled" && modality != "shared") throw Error("--modality: choose decoupled or shared");
      co.decoupled = modality == "decoupled";
      return cmd_convert(co);
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    // Anything else is a bug or an unforeseen input; still one line, never a crash.
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    std::fprintf(stderr, "error: internal: %s\n", msg.c_str());
    return 2;
  }
  return 0;
}
