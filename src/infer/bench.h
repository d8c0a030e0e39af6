// `mlaforge bench`: prefill and decode speed, attention-kernel time and bandwidth, and KV bytes of
// an MLA model against its original, measured in the same process on random weights of the
// checkpoint's configuration (speed does not depend on the values).
#pragma once
#include <cstdint>
#include <string>

#include "model/decoder.h"

namespace mlaforge {

struct BenchOptions {
  std::string model_dir;        // a config.json is enough; weights are not read
  int64_t context = 4096;       // cached tokens per sequence before decoding
  int64_t batch = 1;            // sequences decoded together
  int64_t decode_steps = 16;    // timed decoding steps
  int64_t layers = 0;           // > 0: only this many decoder layers (quick runs of big configs)
  int64_t rope_pairs = -1;      // for an original checkpoint: MLA rotary pairs per KV head (default head_dim/8, dr = 32 at 128)
  int64_t dkv = -1;             // ... and latent width per KV head (default head_dim/4)
  int64_t prefill_chunk = 1024; // prefill in chunks of this many tokens (bounds the score matrix)
  int64_t attention_reps = 20;  // timed repetitions of one layer's decode attention
  CacheOptions cache;           // the MLA model's cache (the original caches keys and values)
  std::string device = "cpu";
  std::string dtype = "auto";   // auto (bf16 on cuda, f32 on cpu), f32, bf16
  std::string report;           // optional JSON report path
};

// Runs the benchmark and prints a table with ratios; returns 0.
int run_bench(const BenchOptions& opts);

}  // namespace mlaforge
