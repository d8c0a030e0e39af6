// The paged latent cache and the absorbed decode kernels against the plain ATen reference in float64.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>

#include "infer/latent_pool.h"

#ifdef MLAFORGE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

using namespace mlaforge;

namespace {

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>() / b.to(at::kDouble).norm().item<double>();
}

struct DecodeCase {
  int64_t heads, kv_heads, rope_dim, latent_dim, block_size;
  KvFormat rope, latent;
  at::Device device = at::kCPU;
};

// Each (sequence, head)'s log-sum-exp in base 2, m + log2(l), of the scores over [seq_begin, seq_end), in
// float64 from the values the pool stores: the reference for MlaDecodeParams::lse. [B, h]
at::Tensor reference_lse(const LatentPool& pool, int64_t layer, const at::Tensor& q_rope, const at::Tensor& q_latent,
                         const PagedBatch& batch, double scale) {
  const int64_t B = q_rope.size(0), h = q_rope.size(1), S = batch.seq_end.max().item<int64_t>();
  at::Tensor slots = position_slots(batch.block_table, pool.block_size(), S);                 // [B, S]
  at::Tensor head_kv = at::div(at::arange(h, slots.options().dtype(at::kLong)), h / pool.kv_heads(), "floor");  // [h]
  at::Tensor KR = pool.read_k_rope(layer, slots, at::kDouble).index_select(2, head_kv);         // [B, S, h, 2r]
  at::Tensor C = pool.read_latent(layer, slots, at::kDouble);                                   // [B, S, R]
  at::Tensor img = pool.read_modality(slots).view({B, 1, S});
  at::Tensor s_rope = (KR * q_rope.to(at::kDouble).unsqueeze(1)).sum(-1).transpose(1, 2);      // [B, h, S]
  at::Tensor s_lat = at::matmul(q_latent.to(at::kDouble), C.transpose(1, 2).unsqueeze(1));      // [B, h, 2, S]
  at::Tensor s = (s_rope + at::where(img, s_lat.select(2, 1), s_lat.select(2, 0))) * (scale * 1.4426950408889634);
  at::Tensor pos = at::arange(S, slots.options().dtype(at::kLong)).view({1, 1, S});
  at::Tensor valid = (pos >= batch.seq_begin.to(at::kLong).view({B, 1, 1})) & (pos < batch.seq_end.to(at::kLong).view({B, 1, 1}));
  s = s.masked_fill(valid.logical_not(), -INFINITY);
  at::Tensor m = std::get<0>(s.max(-1));
  return m + at::log2(at::exp2(s - m.unsqueeze(-1)).sum(-1));
}

struct DecodeErrors {
  double out = 0;  // relative error of the [B, h, 2, R] sums
  double lse = 0;  // largest absolute error of m + log2(l)
};

// A two-layer pool with a few sequences of different lengths and left padding, written through shuffled
// block tables with mixed modalities, and the batch that attends them.
struct CasePool {
  std::unique_ptr<LatentPool> pool;
  PagedBatch batch;
};

CasePool make_case_pool(const DecodeCase& c, uint64_t seed) {
  at::manual_seed(int64_t(seed));
  std::mt19937 rng{static_cast<unsigned>(seed)};
  const std::vector<int64_t> ends{37, 5, 130, 64}, begins{3, 0, 17, 0};
  const int64_t B = int64_t(ends.size()), max_blocks = (130 + c.block_size - 1) / c.block_size;
  LatentPoolOptions opt;
  opt.rope = c.rope;
  opt.latent = c.latent;
  opt.block_size = c.block_size;
  opt.latent_group = 8;
  CasePool cp;
  cp.pool = std::make_unique<LatentPool>(2, c.kv_heads, c.rope_dim, c.latent_dim, B * max_blocks + 3, opt, c.device);
  LatentPool& pool = *cp.pool;
  pool.allocate(3);  // blocks not used by the batch
  at::Tensor table = at::full({B, max_blocks}, -1, at::kInt);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int32_t> blocks = pool.allocate((ends[size_t(b)] + c.block_size - 1) / c.block_size);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    for (size_t i = 0; i < blocks.size(); ++i) table[b][int64_t(i)] = blocks[i];
  }
  // Write every sequence's tokens to both layers (distinct values), image runs in the middle.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = ends[size_t(b)];
    at::Tensor pos = at::arange(n, at::kLong);
    at::Tensor slots = position_slots(table.narrow(0, b, 1), c.block_size, n).view({-1});
    slots = slots.to(c.device);
    at::Tensor img = ((pos >= n / 4) & (pos < n / 2 + 1)).to(c.device);
    pool.write_modality(slots, img);
    for (int64_t l = 0; l < 2; ++l)
      pool.write(l, slots, at::randn({n, c.kv_heads, c.rope_dim}).to(c.device),
                 (at::randn({n, c.latent_dim}) * 2).to(c.device));
  }
  cp.batch = PagedBatch{table.to(c.device), at::tensor(std::vector<int32_t>(begins.begin(), begins.end())).to(c.device),
                        at::tensor(std::vector<int32_t>(ends.begin(), ends.end())).to(c.device)};
  return cp;
}

// The errors of mla_decode (with its log-sum-exp) against the reference on make_case_pool's pool.
DecodeErrors decode_error(const DecodeCase& c, uint64_t seed) {
  const CasePool cp = make_case_pool(c, seed);
  const LatentPool& pool = *cp.pool;
  const PagedBatch& batch = cp.batch;
  const int64_t B = batch.block_table.size(0);
  at::Tensor q_rope = at::randn({B, c.heads, c.rope_dim}, at::kDouble).to(c.device);
  // Latent queries scaled down past 256 columns so that the scores keep the same spread at every width (a
  // softmax that is nearly one-hot tests little, and the float32 error of the log-sum-exp grows with it).
  const double q_scale = 0.3 * std::min(1.0, std::sqrt(256.0 / double(c.latent_dim)));
  at::Tensor q_latent = (at::randn({B, c.heads, 2, c.latent_dim}, at::kDouble) * q_scale).to(c.device);
  const double scale = 0.125;
  DecodeErrors worst;
  for (int64_t l = 0; l < 2; ++l) {
    at::Tensor ref = mla_decode_reference(pool, l, q_rope, q_latent, batch, scale);
    at::Tensor lse;
    at::Tensor got = mla_decode(pool, l, q_rope, q_latent, batch, scale, &lse);
    EXPECT_EQ(got.sizes(), ref.sizes());
    EXPECT_FALSE(got.isnan().any().item<bool>());
    worst.out = std::max(worst.out, rel_err(got.cpu(), ref.cpu()));
    EXPECT_EQ(lse.sizes(), (std::vector<int64_t>{B, c.heads, 2}));
    at::Tensor got_lse = (lse.select(-1, 0) + at::log2(lse.select(-1, 1))).to(at::kDouble).cpu();
    at::Tensor ref_lse = reference_lse(pool, l, q_rope, q_latent, batch, scale).cpu();
    worst.lse = std::max(worst.lse, (got_lse - ref_lse).abs().max().item<double>());
  }
  return worst;
}

std::vector<at::Device> devices() {
  std::vector<at::Device> d{at::kCPU};
  if (at::hasCUDA()) d.emplace_back(at::kCUDA);
  return d;
}

#ifdef MLAFORGE_WITH_CUDA
// Whether the current CUDA device is a Hopper (compute capability 9.x), where the wgmma kernels run.
bool cuda_device_is_hopper() {
  int dev = 0, major = 0;
  return at::hasCUDA() && cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major == 9;
}

// The kernel parameters of layer 0 of make_case_pool's pool and batch for `heads` query heads (no queries or
// output: for asking mla_decode_cuda_kernel which kernel takes them).
MlaDecodeParams case_params(const CasePool& cp, int heads) {
  MlaDecodeParams p = cp.pool->kernel_params(0);
  p.batch = int32_t(cp.batch.block_table.size(0));
  p.heads = heads;
  p.max_blocks = int32_t(cp.batch.block_table.size(1));
  return p;
}
#endif

}  // namespace

TEST(KvQuant, RoundTripWithinHalfAStep) {
  at::manual_seed(0);
  at::Tensor x = at::randn({5, 7, 64}) * 3;
  for (KvFormat f : {KvFormat::Int8, KvFormat::Int4}) {
    QuantizedRows q = quantize_rows(x, f, 16);
    EXPECT_EQ(q.values.size(-1), f == KvFormat::Int4 ? 32 : 64);
    EXPECT_EQ(q.scales.sizes(), (std::vector<int64_t>{5, 7, 4}));
    at::Tensor back = dequantize_rows(q.values, q.scales, f, 16, at::kFloat);
    // Each value within half a quantization step of its group (plus the fp16 rounding of the scale).
    at::Tensor step = q.scales.to(at::kFloat).repeat_interleave(16, -1);
    EXPECT_TRUE(((back - x).abs() <= step * 0.5 + x.abs() * 2e-3 + 1e-6).all().item<bool>()) << kv_format_name(f);
  }
  // All-zero rows stay zero.
  QuantizedRows z = quantize_rows(at::zeros({2, 8}), KvFormat::Int4, 8);
  EXPECT_EQ(dequantize_rows(z.values, z.scales, KvFormat::Int4, 8, at::kFloat).abs().sum().item<float>(), 0.f);
}

TEST(LatentPool, BytesPerTokenOf7BShape) {
  // Qwen2.5-VL-7B-shaped layer cache at dr=32, dkv=32 (g=4, R=128) against its bf16 MHA cache
  // (2 * 4 * 128 values * 2 bytes per layer and token).
  const double mha = 2 * 4 * 128 * 2;
  auto per_token = [](KvFormat rope, KvFormat latent) {
    LatentPoolOptions o;
    o.rope = rope;
    o.latent = latent;
    return LatentPool(1, 4, 32, 128, 4, o, at::kCPU).bytes_per_token();
  };
  const double bf16 = per_token(KvFormat::BF16, KvFormat::BF16);
  const double int4 = per_token(KvFormat::BF16, KvFormat::Int4);
  const double int4_int8 = per_token(KvFormat::Int8, KvFormat::Int4);
  std::printf("bytes per token and layer: bf16 %.0f (%.2fx), int4 latent %.0f (%.2fx), int4+int8 rope %.0f (%.2fx)\n",
              bf16, mha / bf16, int4, mha / int4, int4_int8, mha / int4_int8);
  EXPECT_GE(mha / bf16, 3.9);
  EXPECT_GE(mha / int4, 5.8);
  EXPECT_GE(mha / int4_int8, 9.5);
}

// --kv-window's merge: the kernel over [begin, mid) plus the window's exact copies of [mid, end), merged
// through the kernel's log-sum-exp, equals the kernel over [begin, end); rows whose window holds all of
// the sequence (empty kernel range) included. On every device: with float32 storage (CPU kernel, CUDA-core
// kernel), bf16 at the Qwen2.5-VL-7B shape (row-pair kernel) and llava-1.5-7b's at 4 pairs and dkv 8 (MHA
// row-pair kernel on a Hopper), and int4/int8 (tensor-core kernel); rows of up
// to 1500 positions so that the CUDA kernels split the sequence and the combine writes the log-sum-exp.
TEST(MlaDecode, WindowMergeEqualsOneCache) {
  struct Case {
    int64_t g, rd, R, bs, h;
    KvFormat rope, latent;
  };
  const std::vector<Case> cases{{2, 8, 32, 16, 6, KvFormat::F32, KvFormat::F32},
                                {4, 32, 128, 64, 28, KvFormat::BF16, KvFormat::BF16},
                                {32, 8, 256, 64, 32, KvFormat::BF16, KvFormat::BF16},
                                {2, 8, 32, 16, 6, KvFormat::Int8, KvFormat::Int4}};
  for (at::Device dev : devices()) {
    for (const Case& k : cases) {
      at::manual_seed(3);
      const int64_t W = 20;
      const std::vector<int64_t> begins{3, 0, 10}, ends{1500, 15, 51};
      const int64_t B = 3, max_blocks = (1500 + k.bs - 1) / k.bs;
      LatentPoolOptions opt;
      opt.rope = k.rope;
      opt.latent = k.latent;
      opt.block_size = k.bs;
      opt.latent_group = 8;
      LatentPool pool(1, k.g, k.rd, k.R, B * max_blocks, opt, dev);
      at::Tensor table = at::full({B, max_blocks}, 0, at::kInt);
      std::vector<int32_t> mids;
      at::Tensor win_rope = at::zeros({B, W, k.g, k.rd}), win_latent = at::zeros({B, W, k.R});
      at::Tensor win_img = at::zeros({B, W}, at::kBool), win_valid = at::zeros({B, W}, at::kBool);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t n = ends[size_t(b)];
        std::vector<int32_t> blocks = pool.allocate((n + k.bs - 1) / k.bs);
        for (size_t i = 0; i < blocks.size(); ++i) table[b][int64_t(i)] = blocks[i];
        at::Tensor slots = position_slots(table.narrow(0, b, 1), k.bs, n).view({-1}).to(dev);
        pool.write_modality(slots, ((at::arange(n) % 7) < 3).to(dev));
        pool.write(0, slots, at::randn({n, k.g, k.rd}).to(dev), at::randn({n, k.R}).to(dev));
        const int64_t mid = std::max(begins[size_t(b)], n - W);
        mids.push_back(int32_t(mid));
        at::Tensor recent = slots.narrow(0, mid, n - mid);  // the window's copies (slot order does not matter)
        win_rope[b].narrow(0, 0, n - mid).copy_(pool.read_k_rope(0, recent, at::kFloat));
        win_latent[b].narrow(0, 0, n - mid).copy_(pool.read_latent(0, recent, at::kFloat));
        win_img[b].narrow(0, 0, n - mid).copy_(pool.read_modality(recent));
        win_valid[b].narrow(0, 0, n - mid).fill_(true);
      }
      auto ints = [&](const std::vector<int64_t>& v) { return at::tensor(std::vector<int32_t>(v.begin(), v.end())).to(dev); };
      at::Tensor q_rope = (at::randn({B, k.h, k.rd}) * 0.3).to(dev), q_latent = (at::randn({B, k.h, 2, k.R}) * 0.3).to(dev);
      at::Tensor whole = mla_decode(pool, 0, q_rope, q_latent, PagedBatch{table.to(dev), ints(begins), ints(ends)}, 0.2);
      at::Tensor merged = mla_decode_window(pool, 0, q_rope, q_latent,
                                            PagedBatch{table.to(dev), ints(begins), at::tensor(mids).to(dev)}, 0.2,
                                            DecodeWindow{win_rope.to(dev), win_latent.to(dev), win_img.to(dev), win_valid.to(dev)});
      // The kernel rounds queries to bf16 for bf16 and quantized caches on CUDA; the window part is float32.
      const bool bf16_math = dev.is_cuda() && k.latent != KvFormat::F32;
      const double err = rel_err(merged.cpu(), whole.cpu());
      std::printf("%s rope %s latent %s: window merge vs one cache %.2e\n", dev.str().c_str(), kv_format_name(k.rope),
                  kv_format_name(k.latent), err);
      EXPECT_LE(err, bf16_math ? 1e-2 : 1e-5) << dev << " " << kv_format_name(k.latent);
      EXPECT_EQ(mids[1], 0);  // row 1 lies entirely in its window
    }
  }
}

TEST(LatentPool, BlocksComeBackAndExhaustionIsAnError) {
  LatentPool pool(1, 1, 2, 4, 3, LatentPoolOptions{}, at::kCPU);
  std::vector<int32_t> a = pool.allocate(2);
  EXPECT_EQ(pool.free_blocks(), 1);
  EXPECT_THROW(pool.allocate(2), std::exception);
  pool.release(a);
  EXPECT_EQ(pool.free_blocks(), 3);
}

// The bf16 copy that CUDA decodes quantized wide latents over (mla_decode): every attended position holds what
// the pool reads back in bf16, its block table leads there, and the CPU kernel over the copy gives the
// reference's result on the quantized pool to bf16 rounding.
TEST(MlaDecode, DenseBf16CopyHoldsWhatTheBatchAttends) {
  for (KvFormat rope : {KvFormat::BF16, KvFormat::Int8}) {
    for (KvFormat latent : {KvFormat::Int8, KvFormat::Int4}) {
      const DecodeCase c{8, 2, 16, 64, 16, rope, latent, at::kCPU};
      const CasePool cp = make_case_pool(c, 11);
      const LatentPool& pool = *cp.pool;
      const PagedBatch& batch = cp.batch;
      const int64_t B = batch.block_table.size(0), S = batch.seq_end.max().item<int64_t>();
      const DenseBf16Copy dense = dense_bf16_copy(pool, 1, batch);
      ASSERT_EQ(dense.latent.scalar_type(), at::kBFloat16);
      at::Tensor pool_slots = position_slots(batch.block_table, c.block_size, S);  // [B, S]
      at::Tensor dense_slots = position_slots(dense.block_table, c.block_size, S);
      auto rows = [](const at::Tensor& t, const at::Tensor& slots) {
        return t.reshape({t.size(0) * t.size(1), -1}).index_select(0, slots.reshape({-1}));
      };
      at::Tensor valid = (at::arange(S).view({1, S}) >= batch.seq_begin.to(at::kLong).view({B, 1})) &
                         (at::arange(S).view({1, S}) < batch.seq_end.to(at::kLong).view({B, 1}));
      at::Tensor v = valid.reshape({-1});
      EXPECT_TRUE(at::equal(rows(dense.latent, dense_slots).index({v}),
                            pool.read_latent(1, pool_slots, at::kBFloat16).reshape({B * S, -1}).index({v})));
      EXPECT_TRUE(at::equal(rows(dense.k_rope, dense_slots).index({v}),
                            pool.read_k_rope(1, pool_slots, at::kBFloat16).reshape({B * S, -1}).index({v})));
      EXPECT_TRUE(at::equal(rows(dense.is_image, dense_slots).index({v}).to(at::kBool).reshape({-1}),
                            pool.read_modality(pool_slots).reshape({-1}).index({v})));

      at::Tensor q_rope = at::randn({B, c.heads, c.rope_dim});
      at::Tensor q_latent = at::randn({B, c.heads, 2, c.latent_dim}) * 0.3;
      at::Tensor begin = batch.seq_begin.to(at::kInt).contiguous(), end = batch.seq_end.to(at::kInt).contiguous();
      at::Tensor out = at::empty({B, c.heads, 2, c.latent_dim});
      EXPECT_EQ(pool.kernel_params(1).num_blocks, pool.num_blocks());
      MlaDecodeParams p = dense.params(pool.kernel_params(1));
      EXPECT_EQ(p.num_blocks, dense.k_rope.size(0));  // the copy's blocks, not the pool's
      p.batch = int32_t(B);
      p.heads = int32_t(c.heads);
      p.scale = 0.125f;
      p.q_rope = q_rope.data_ptr<float>();
      p.q_latent = q_latent.data_ptr<float>();
      p.seq_begin = begin.data_ptr<int32_t>();
      p.seq_end = end.data_ptr<int32_t>();
      p.out = out.data_ptr<float>();
      mla_decode_cpu(p);
      at::Tensor ref = mla_decode_reference(pool, 1, q_rope.to(at::kDouble), q_latent.to(at::kDouble), batch, 0.125);
      EXPECT_LE(rel_err(out, ref), 1e-2) << kv_format_name(rope) << " " << kv_format_name(latent);
    }
  }
}

// llava-1.5-7b's default conversion (32 heads, 32 rotary values per head, latent 1024) with an int8 or int4
// cache: on a Hopper the two-pass kernels read the quantized chunks themselves, as they read bf16, instead of
// mla_decode decoding over a bf16 copy of the cache (KernelMatchesReferenceEveryFormat checks their results).
TEST(MlaDecode, QuantizedWideLatentsTakeTheTwoPassKernels) {
#ifdef MLAFORGE_WITH_CUDA
  if (!cuda_device_is_hopper()) GTEST_SKIP() << "needs a Hopper GPU";
  for (KvFormat rope : {KvFormat::BF16, KvFormat::Int8}) {
    for (KvFormat latent : {KvFormat::BF16, KvFormat::Int8, KvFormat::Int4}) {
      const CasePool cp = make_case_pool(DecodeCase{32, 32, 32, 1024, 64, rope, latent, at::kCUDA}, 5);
      EXPECT_EQ(mla_decode_cuda_kernel(case_params(cp, 32)), MlaCudaKernel::TwoPass)
          << "rope " << kv_format_name(rope) << " latent " << kv_format_name(latent);
    }
  }
#else
  GTEST_SKIP() << "a build without CUDA kernels";
#endif
}

// llava-1.5-7b at 4 or 8 rotary pairs and dkv 8 (bf16): on a Hopper the MHA row-pair kernel, whose tiles come
// through tensor maps of the pool; it needs the pool's size (num_blocks) for them, and without it another kernel
// takes the shape (the tensor-core one at 4 pairs, the two-pass ones at 8; KernelMatchesReferenceEveryFormat
// checks their results).
TEST(MlaDecode, MhaShapeTakesTheRowPairKernelWithThePoolSize) {
#ifdef MLAFORGE_WITH_CUDA
  if (!cuda_device_is_hopper()) GTEST_SKIP() << "needs a Hopper GPU";
  for (int64_t rope_dim : {8, 16}) {
    const CasePool cp =
        make_case_pool(DecodeCase{32, 32, rope_dim, 256, 64, KvFormat::BF16, KvFormat::BF16, at::kCUDA}, 5);
    MlaDecodeParams p = case_params(cp, 32);
    EXPECT_EQ(mla_decode_cuda_kernel(p), MlaCudaKernel::RowPair) << "rope_dim " << rope_dim;
    p.num_blocks = 0;
    EXPECT_NE(mla_decode_cuda_kernel(p), MlaCudaKernel::RowPair) << "rope_dim " << rope_dim;
  }
#else
  GTEST_SKIP() << "a build without CUDA kernels";
#endif
}

TEST(MlaDecode, KernelMatchesReferenceEveryFormat) {
  for (at::Device dev : devices()) {
    for (KvFormat rope : {KvFormat::F32, KvFormat::BF16, KvFormat::Int8}) {
      for (KvFormat latent : {KvFormat::F32, KvFormat::BF16, KvFormat::Int8, KvFormat::Int4}) {
        // The last two shapes: Qwen2.5-VL-7B's at 16 rotary pairs and dkv 32 (28 heads, 4 KV heads, 128
        // rotary values and latent 128 per token, 64-token blocks), on CUDA the row-pair kernel; llava-1.5-7b's
        // at 4 and 8 pairs and dkv 8 (32 heads and KV heads, 8 or 16 rotary values per head, latent 256), on a
        // Hopper the MHA row-pair kernel; then latents too wide for one CTA's accumulators (on CUDA the two-pass
        // kernels: bf16, and int8/int4 on a Hopper): llava-1.5-7b's default conversion (16 pairs, dkv 32: latent 1024), a GQA shape
        // with 32-token blocks, one with 16 rotary values per KV head.
        for (auto shape : std::vector<std::array<int64_t, 5>>{{8, 2, 4, 32, 16},
                                                               {3, 3, 8, 16, 64},
                                                               {4, 1, 2, 24, 7},
                                                               {28, 4, 32, 128, 64},
                                                               {32, 32, 8, 256, 64},
                                                               {32, 32, 16, 256, 64},
                                                               {32, 32, 32, 1024, 64},
                                                               {20, 4, 32, 512, 32},
                                                               {24, 8, 16, 384, 64}}) {
          DecodeCase c{shape[0], shape[1], shape[2], shape[3], shape[4], rope, latent, dev};
          const DecodeErrors err = decode_error(c, 7);
          // The reference reads the same stored (quantized) values, so only arithmetic differs: float32
          // in the kernels against float64. The CUDA kernel's tensor-core path for bf16 and quantized
          // caches multiplies bf16-rounded queries and probabilities: the bf16 bound, 1e-2 (and 2e-2 on
          // the log-sum-exp, a few units in log2 here).
          const bool bf16_math = dev.is_cuda() && !(rope == KvFormat::F32 && latent == KvFormat::F32);
          EXPECT_LE(err.out, bf16_math ? 1e-2 : 1e-5) << dev << " rope " << kv_format_name(rope) << " latent "
                                                      << kv_format_name(latent) << " heads " << shape[0] << " kv " << shape[1];
          EXPECT_LE(err.lse, bf16_math ? 2e-2 : 1e-5) << dev << " rope " << kv_format_name(rope) << " latent "
                                                      << kv_format_name(latent) << " heads " << shape[0] << " kv " << shape[1];
        }
      }
    }
  }
}
