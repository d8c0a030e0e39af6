// Google Benchmark of the CPU absorbed-MLA decode kernel (kernels/cpu/mla_decode_cpu.cpp) on one
// Qwen2.5-VL-7B-shaped layer, against the original model's GQA decode over its K/V cache in plain ATen.
//
//   MLA: 28 query heads, 4 KV heads, rotary keys 2r = 32 per KV head (bf16), latent R = 128 in
//        bf16 / int8 / int4 (group 32), paged in blocks of 64 tokens; mla_decode() as the model calls it.
//   MHA: 28 query heads over 4 KV heads of head_dim 128: K, V [B, 4, S, 128] float32 holding
//        bf16-rounded values (ATen's CPU bf16 matmul is far slower than its float one, so the fair
//        baseline reads float32), q [B, 4, 7, 128]; softmax(q K^T * scale) V with at::matmul/softmax.
//
// Counters: bytes = cache bytes read per call (MLA: latent, scales, rotary keys and modality byte of
// every attended token; MHA: the float32 K and V it reads), bf16_bytes (MHA only) = what the model's
// bf16 cache of the same tokens would hold; bytes_per_second from SetBytesProcessed.
//
// Run: OMP_WAIT_POLICY=PASSIVE is set (and the program restarted) as src/cli/main.cpp does; threads
// are all cores, as in mlaforge, or --threads=N (before the benchmark flags). On a shared machine,
// --benchmark_repetitions=10 --benchmark_enable_random_interleaving=true and read the _min rows' time
// (their bytes_per_second is the lowest of the repetitions' rates, not bytes / the _min time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <tuple>

#include "core/threads.h"
#include "infer/latent_pool.h"

using namespace mlaforge;

namespace {

constexpr int64_t kHeads = 28, kKvHeads = 4, kHeadDim = 128, kRope = 32, kLatent = 128, kBlock = 64;
const double kScale = 1.0 / std::sqrt(double(kHeadDim));

KvFormat latent_format(int64_t arg) {
  switch (arg) {
    case 0: return KvFormat::BF16;
    case 1: return KvFormat::Int8;
    default: return KvFormat::Int4;
  }
}

// One layer's pool with `batch` sequences of `ctx` tokens of random data (the middle quarter image
// tokens, as after an image in the prompt), the batch view and random queries.
struct MlaSetup {
  std::unique_ptr<LatentPool> pool;
  PagedBatch batch;
  at::Tensor q_rope, q_latent;  // [B, h, 2r], [B, h, 2, R]
  double bytes = 0;             // cache bytes read per call
};

const MlaSetup& mla_setup(KvFormat fmt, int64_t ctx, int64_t B) {
  static std::map<std::tuple<int, int64_t, int64_t>, MlaSetup> cache;  // built once per shape
  auto key = std::make_tuple(int(fmt), ctx, B);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  at::manual_seed(0);
  LatentPoolOptions opt;
  opt.latent = fmt;
  opt.rope = KvFormat::BF16;
  opt.block_size = kBlock;
  opt.latent_group = 32;
  const int64_t per_seq = (ctx + kBlock - 1) / kBlock;
  MlaSetup s;
  s.pool = std::make_unique<LatentPool>(1, kKvHeads, kRope, kLatent, B * per_seq, opt, at::kCPU);
  at::Tensor table = at::empty({B, per_seq}, at::kInt);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int32_t> blocks = s.pool->allocate(per_seq);
    for (int64_t i = 0; i < per_seq; ++i) table[b][i] = blocks[size_t(i)];
  }
  at::Tensor pos = at::arange(ctx, at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor slots = table[b].to(at::kLong).index_select(0, at::div(pos, kBlock, "floor")) * kBlock +
                       pos.remainder(kBlock);
    s.pool->write_modality(slots, (pos >= ctx / 4) & (pos < ctx / 2));
    s.pool->write(0, slots, at::randn({ctx, kKvHeads, kRope}), at::randn({ctx, kLatent}));
  }
  s.batch = {table, at::zeros({B}, at::kInt), at::full({B}, ctx, at::kInt)};
  s.q_rope = at::randn({B, kHeads, kRope});
  s.q_latent = at::randn({B, kHeads, 2, kLatent}) * 0.1;
  s.bytes = s.pool->bytes_per_token() * double(B * ctx);  // the pool holds exactly the batch's tokens
  return cache.emplace(key, std::move(s)).first->second;
}

// Args: latent format (0 bf16, 1 int8, 2 int4), context, batch.
void BM_MlaDecodeCpu(benchmark::State& state) {
  const KvFormat fmt = latent_format(state.range(0));
  const int64_t ctx = state.range(1), B = state.range(2);
  const MlaSetup& s = mla_setup(fmt, ctx, B);
  for (auto _ : state) {
    at::Tensor out = mla_decode(*s.pool, 0, s.q_rope, s.q_latent, s.batch, kScale);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  state.SetLabel(std::string("latent ") + kv_format_name(fmt) + ", rope bf16");
  state.counters["bytes"] = s.bytes;
  state.SetBytesProcessed(int64_t(s.bytes * double(state.iterations())));
}

// Args: context, batch.
void BM_MhaDecodeAten(benchmark::State& state) {
  const int64_t ctx = state.range(0), B = state.range(1), group = kHeads / kKvHeads;
  at::manual_seed(0);
  // bf16-rounded values held in float32: [B, g, S, dh]
  const at::Tensor K = at::randn({B, kKvHeads, ctx, kHeadDim}).to(at::kBFloat16).to(at::kFloat);
  const at::Tensor V = at::randn({B, kKvHeads, ctx, kHeadDim}).to(at::kBFloat16).to(at::kFloat);
  const at::Tensor q = at::randn({B, kKvHeads, group, kHeadDim});  // the 28 heads grouped by KV head
  for (auto _ : state) {
    at::Tensor p = at::softmax(at::matmul(q, K.transpose(2, 3)) * kScale, -1);  // [B, g, group, S]
    at::Tensor out = at::matmul(p, V);                                          // [B, g, group, dh]
    benchmark::DoNotOptimize(out.data_ptr());
  }
  const double bytes = double(2 * B * kKvHeads * ctx * kHeadDim * 4);
  state.SetLabel("GQA f32 K/V (bf16 values)");
  state.counters["bytes"] = bytes;
  state.counters["bf16_bytes"] = bytes / 2;
  state.SetBytesProcessed(int64_t(bytes * double(state.iterations())));
}

// With repetitions, the fastest one too: the least disturbed by other work on a shared machine.
double min_of(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end()); }

BENCHMARK(BM_MlaDecodeCpu)
    ->ArgNames({"fmt", "ctx", "batch"})
    ->ArgsProduct({{0, 1, 2}, {1024, 4096}, {1, 8}})
    ->UseRealTime()
    ->ComputeStatistics("min", min_of)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MhaDecodeAten)
    ->ArgNames({"ctx", "batch"})
    ->ArgsProduct({{1024, 4096}, {1, 8}})
    ->UseRealTime()
    ->ComputeStatistics("min", min_of)
    ->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  // As src/cli/main.cpp: libgomp reads OMP_WAIT_POLICY when it loads, and its spinning threads slow
  // OpenBLAS (the baseline's matmuls) down; set it and restart once.
  if (!std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then carry on as we are
  }
  // --threads=N (ours, taken out before Google Benchmark parses the rest); default all cores, as mlaforge.
  int threads = 0;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0)
      threads = std::atoi(argv[i] + 10);
    else
      argv[kept++] = argv[i];
  }
  argc = kept;
  set_threads(threads);
  benchmark::AddCustomContext("intra_op_threads", std::to_string(at::get_num_threads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
