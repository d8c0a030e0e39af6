#include "infer/latent_pool.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>

#include "core/error.h"

#ifdef MLAFORGE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace mlaforge {

KvFormat parse_kv_format(const std::string& name, const std::string& what) {
  if (name == "f32" || name == "auto") return KvFormat::F32;
  if (name == "bf16") return KvFormat::BF16;
  if (name == "int8") return KvFormat::Int8;
  if (name == "int4") return KvFormat::Int4;
  fail(what, "unknown cache format '", name, "' (expected auto, f32, bf16, int8 or int4)");
}

namespace {

bool quantized(KvFormat f) { return f == KvFormat::Int8 || f == KvFormat::Int4; }

at::ScalarType storage_dtype(KvFormat f) {
  switch (f) {
    case KvFormat::F32: return at::kFloat;
    case KvFormat::BF16: return at::kBFloat16;
    case KvFormat::Int8: return at::kChar;
    case KvFormat::Int4: return at::kByte;
  }
  return at::kFloat;
}

// Stored values per row of `d` values.
int64_t stored_width(KvFormat f, int64_t d) { return f == KvFormat::Int4 ? d / 2 : d; }

// The largest divisor of d that is at most `want` and even (Int4 packs pairs within a group).
int64_t group_for(int64_t d, int64_t want) {
  for (int64_t g = std::min(want, d); g >= 2; --g)
    if (d % g == 0 && g % 2 == 0) return g;
  return d;
}

}  // namespace

QuantizedRows quantize_rows(const at::Tensor& x, KvFormat format, int64_t group) {
  check(quantized(format), "kv cache", "quantize_rows needs int8 or int4");
  const int64_t D = x.size(-1);
  check(D % group == 0 && (format != KvFormat::Int4 || group % 2 == 0), "kv cache", "group ", group,
        " does not divide ", D, " values into even groups");
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> grouped = lead;
  grouped.push_back(D / group);
  grouped.push_back(group);
  const double qmax = format == KvFormat::Int8 ? 127.0 : 7.0;
  at::Tensor xs = x.to(at::kFloat).reshape(grouped);                     // [..., D/group, group]
  at::Tensor scales = (xs.abs().amax(-1) / qmax).to(at::kHalf);          // [..., D/group]
  at::Tensor s = scales.to(at::kFloat).unsqueeze(-1);
  at::Tensor q = at::where(s > 0, xs / s, at::zeros_like(xs)).round().clamp(-qmax, qmax);
  std::vector<int64_t> flat = lead;
  flat.push_back(D);
  if (format == KvFormat::Int8) return {q.to(at::kChar).reshape(flat), scales};
  // Int4: q + 8 in [1, 15]; element 2i in the low nibble, 2i+1 in the high one.
  std::vector<int64_t> pairs = lead;
  pairs.push_back(D / 2);
  pairs.push_back(2);
  at::Tensor u = (q + 8).to(at::kInt).reshape(pairs);
  at::Tensor packed = (u.select(-1, 0) + u.select(-1, 1) * 16).to(at::kByte);  // [..., D/2]
  return {packed, scales};
}

at::Tensor dequantize_rows(const at::Tensor& values, const at::Tensor& scales, KvFormat format, int64_t group,
                           at::ScalarType dtype) {
  at::Tensor q;
  if (format == KvFormat::Int8) {
    q = values.to(at::kFloat);
  } else {
    check(format == KvFormat::Int4, "kv cache", "dequantize_rows needs int8 or int4");
    at::Tensor u = values.to(at::kInt);
    at::Tensor lo = u.remainder(16) - 8, hi = at::div(u, 16, "floor") - 8;
    q = at::stack({lo, hi}, -1).flatten(-2).to(at::kFloat);  // [..., D]
  }
  const int64_t D = q.size(-1);
  std::vector<int64_t> grouped(q.sizes().begin(), q.sizes().end() - 1);
  grouped.push_back(D / group);
  grouped.push_back(group);
  return (q.reshape(grouped) * scales.to(at::kFloat).unsqueeze(-1)).flatten(-2).to(dtype);
}

LatentPool::LatentPool(int64_t layers, int64_t kv_heads, int64_t rope_dim, int64_t latent_dim, int64_t num_blocks,
                       const LatentPoolOptions& options, const at::Device& device)
    : opt_(options), kv_heads_(kv_heads), rope_dim_(rope_dim), latent_dim_(latent_dim), num_blocks_(num_blocks) {
  check(opt_.rope != KvFormat::Int4, "kv cache", "rotary keys are stored as f32, bf16 or int8, not int4");
  check(opt_.block_size > 0 && num_blocks > 0, "kv cache", "empty pool");
  opt_.latent_group = group_for(latent_dim, opt_.latent_group);
  check(opt_.latent != KvFormat::Int4 || latent_dim % 2 == 0, "kv cache", "int4 needs an even latent size, got ",
        latent_dim);
  const int64_t NB = num_blocks, bs = opt_.block_size;
  auto opts = [&](at::ScalarType t) { return at::TensorOptions().dtype(t).device(device); };
  for (int64_t l = 0; l < layers; ++l) {
    k_rope_.push_back(at::zeros({NB, bs, kv_heads, stored_width(opt_.rope, rope_dim)}, opts(storage_dtype(opt_.rope))));
    latent_.push_back(at::zeros({NB, bs, stored_width(opt_.latent, latent_dim)}, opts(storage_dtype(opt_.latent))));
    if (quantized(opt_.rope)) k_rope_scale_.push_back(at::zeros({NB, bs, kv_heads}, opts(at::kHalf)));
    if (quantized(opt_.latent))
      latent_scale_.push_back(at::zeros({NB, bs, latent_dim / opt_.latent_group}, opts(at::kHalf)));
  }
  is_image_ = at::zeros({NB, bs}, opts(at::kByte));
  free_.resize(size_t(NB));
  // Handed out from the back: block 0 first.
  std::iota(free_.rbegin(), free_.rend(), 0);
}

std::vector<int32_t> LatentPool::allocate(int64_t n) {
  check(n <= free_blocks(), "kv cache", "pool exhausted: ", n, " blocks wanted, ", free_blocks(), " of ",
        num_blocks_, " free");
  std::vector<int32_t> out(free_.end() - n, free_.end());
  std::reverse(out.begin(), out.end());
  free_.resize(free_.size() - size_t(n));
  return out;
}

void LatentPool::release(const std::vector<int32_t>& blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) free_.push_back(*it);
}

namespace {
// A pool tensor [NB, bs, rest...] viewed by flat slot: [NB*bs, rest...] (writes go to the pool).
at::Tensor by_slot(const at::Tensor& t) { return t.flatten(0, 1); }
}  // namespace

void LatentPool::write(int64_t layer, const at::Tensor& slots, const at::Tensor& k_rope, const at::Tensor& latent) {
  const int64_t l = layer;
  at::Tensor idx = slots.to(at::kLong);
  auto store = [&](at::Tensor& dst, at::Tensor* dst_scale, const at::Tensor& x, KvFormat f, int64_t group) {
    if (!quantized(f)) {
      by_slot(dst).index_put_({idx}, x.to(dst.scalar_type()));
      return;
    }
    QuantizedRows q = quantize_rows(x, f, group);
    by_slot(dst).index_put_({idx}, q.values);
    at::Tensor scales = by_slot(*dst_scale);  // [NB*bs, scales per token]
    scales.index_put_({idx}, q.scales.reshape({x.size(0), scales.size(1)}));
  };
  store(k_rope_[l], quantized(opt_.rope) ? &k_rope_scale_[l] : nullptr, k_rope, opt_.rope, rope_dim_);
  store(latent_[l], quantized(opt_.latent) ? &latent_scale_[l] : nullptr, latent, opt_.latent, opt_.latent_group);
}

void LatentPool::write_modality(const at::Tensor& slots, const at::Tensor& is_image) {
  is_image_.view({-1}).index_put_({slots.to(at::kLong)}, is_image.to(at::kByte));
}

namespace {
// Rows `slots` [...] of a pool tensor [NB, bs, rest...] -> [..., rest...].
at::Tensor gather(const at::Tensor& t, const at::Tensor& slots) {
  std::vector<int64_t> out(slots.sizes().begin(), slots.sizes().end());
  out.insert(out.end(), t.sizes().begin() + 2, t.sizes().end());
  return by_slot(t).index_select(0, slots.reshape({-1}).to(at::kLong)).view(out);
}
}  // namespace

at::Tensor LatentPool::read_k_rope(int64_t layer, const at::Tensor& slots, at::ScalarType dtype) const {
  at::Tensor v = gather(k_rope_[layer], slots);  // [..., g, 2r]
  if (!quantized(opt_.rope)) return v.to(dtype);
  return dequantize_rows(v, gather(k_rope_scale_[layer], slots).unsqueeze(-1), opt_.rope, rope_dim_, dtype);
}

at::Tensor LatentPool::read_latent(int64_t layer, const at::Tensor& slots, at::ScalarType dtype) const {
  at::Tensor v = gather(latent_[layer], slots);  // [..., R]
  if (!quantized(opt_.latent)) return v.to(dtype);
  return dequantize_rows(v, gather(latent_scale_[layer], slots), opt_.latent, opt_.latent_group, dtype);
}

at::Tensor LatentPool::read_modality(const at::Tensor& slots) const { return gather(is_image_, slots).to(at::kBool); }

void LatentPool::copy_slots(const LatentPool& src, const at::Tensor& src_slots, const at::Tensor& dst_slots) {
  check(src.opt_.latent == opt_.latent && src.opt_.rope == opt_.rope && src.opt_.block_size == opt_.block_size &&
            src.latent_dim_ == latent_dim_ && src.rope_dim_ == rope_dim_ && src.layers() == layers(),
        "kv cache", "cannot copy between pools of different shapes or formats");
  at::Tensor from = src_slots.to(at::kLong), to = dst_slots.to(at::kLong);
  auto copy = [&](at::Tensor& dst, const at::Tensor& s) { by_slot(dst).index_put_({to}, by_slot(s).index_select(0, from)); };
  for (size_t l = 0; l < k_rope_.size(); ++l) {
    copy(k_rope_[l], src.k_rope_[l]);
    copy(latent_[l], src.latent_[l]);
    if (!k_rope_scale_.empty()) copy(k_rope_scale_[l], src.k_rope_scale_[l]);
    if (!latent_scale_.empty()) copy(latent_scale_[l], src.latent_scale_[l]);
  }
  copy(is_image_, src.is_image_);
}

MlaDecodeParams LatentPool::kernel_params(int64_t layer) const {
  MlaDecodeParams p;
  p.kv_heads = int32_t(kv_heads_);
  p.rope_dim = int32_t(rope_dim_);
  p.latent_dim = int32_t(latent_dim_);
  p.block_size = int32_t(opt_.block_size);
  p.num_blocks = int32_t(num_blocks());
  p.latent_group = int32_t(opt_.latent_group);
  p.rope_format = opt_.rope;
  p.k_rope = k_rope_[layer].data_ptr();
  if (quantized(opt_.rope)) p.k_rope_scale = static_cast<const uint16_t*>(k_rope_scale_[layer].data_ptr());
  p.latent_format = opt_.latent;
  p.latent = latent_[layer].data_ptr();
  if (quantized(opt_.latent)) p.latent_scale = static_cast<const uint16_t*>(latent_scale_[layer].data_ptr());
  p.is_image = is_image_.data_ptr<uint8_t>();
  return p;
}

int64_t LatentPool::bytes() const {
  int64_t b = is_image_.numel() * is_image_.element_size();
  for (const auto* list : {&k_rope_, &k_rope_scale_, &latent_, &latent_scale_})
    for (const at::Tensor& t : *list) b += t.numel() * t.element_size();
  return b;
}

at::Tensor position_slots(const at::Tensor& block_table, int64_t block_size, int64_t S) {
  at::Tensor pos = at::arange(S, at::TensorOptions().dtype(at::kLong).device(block_table.device()));  // [S]
  at::Tensor blk = block_table.to(at::kLong).index_select(1, at::div(pos, block_size, "floor"));     // [B, S]
  return blk.clamp_min(0) * block_size + pos.remainder(block_size);
}

namespace {
// Flat slots [B, S] of positions 0..S-1 through the block tables, and which are attended [B, S].
std::pair<at::Tensor, at::Tensor> batch_slots(const PagedBatch& batch, int64_t block_size, int64_t S) {
  at::Tensor pos = at::arange(S, at::TensorOptions().dtype(at::kLong).device(batch.block_table.device()));  // [S]
  at::Tensor slots = position_slots(batch.block_table, block_size, S);
  at::Tensor valid = (pos.view({1, S}) >= batch.seq_begin.to(at::kLong).view({-1, 1})) &
                     (pos.view({1, S}) < batch.seq_end.to(at::kLong).view({-1, 1}));
  return {slots, valid};
}

// The absorbed scores q_rope . k_rope + q_m(t) . c_t of every query head against tokens given in the
// open: q_rope [B, h, 2r], q_latent [B, h, 2, R], KR [B, S, g, 2r], C [B, S, R], img [B, 1, S] bool -> [B, h, S]
// (unscaled).
at::Tensor absorbed_scores(const at::Tensor& q_rope, const at::Tensor& q_latent, const at::Tensor& KR,
                           const at::Tensor& C, const at::Tensor& img) {
  const int64_t B = q_rope.size(0), h = q_rope.size(1), g = KR.size(2), S = KR.size(1);
  at::Tensor s_rope = at::matmul(q_rope.view({B, g, h / g, -1}), KR.permute({0, 2, 3, 1})).reshape({B, h, S});
  at::Tensor s_lat = at::matmul(q_latent, C.transpose(1, 2).unsqueeze(1));  // [B, h, 2, S]
  return s_rope + at::where(img, s_lat.select(2, 1), s_lat.select(2, 0));
}

// Weights p [B, h, S] summed over the latents C [B, S, R] of text and of image tokens (img [B, 1, S]):
// [B, h, 2, R].
at::Tensor modality_sums(const at::Tensor& p, const at::Tensor& C, const at::Tensor& img) {
  at::Tensor p_img = p * img.to(p.scalar_type());
  return at::stack({at::matmul(p - p_img, C), at::matmul(p_img, C)}, 2);
}

void check_decode_args(const LatentPool& pool, const at::Tensor& q_rope, const at::Tensor& q_latent,
                       const PagedBatch& batch) {
  const int64_t B = q_rope.size(0), h = q_rope.size(1);
  check(q_rope.dim() == 3 && q_rope.size(2) == pool.rope_dim(), "mla decode", "q_rope must be [B, h, ",
        pool.rope_dim(), "]");
  check(q_latent.dim() == 4 && q_latent.size(0) == B && q_latent.size(1) == h && q_latent.size(2) == 2 &&
            q_latent.size(3) == pool.latent_dim(),
        "mla decode", "q_latent must be [B, h, 2, ", pool.latent_dim(), "]");
  check(h % pool.kv_heads() == 0, "mla decode", h, " query heads do not group over ", pool.kv_heads(), " KV heads");
  check(batch.block_table.dim() == 2 && batch.block_table.size(0) == B && batch.seq_begin.numel() == B &&
            batch.seq_end.numel() == B,
        "mla decode", "block table / sequence bounds do not match the batch of ", B);
}
}  // namespace

at::Tensor mla_decode_reference(const LatentPool& pool, int64_t layer, const at::Tensor& q_rope,
                                const at::Tensor& q_latent, const PagedBatch& batch, double scale) {
  check_decode_args(pool, q_rope, q_latent, batch);
  const int64_t B = q_rope.size(0);
  const int64_t S = batch.seq_end.max().item<int64_t>();
  const auto dtype = q_rope.scalar_type();
  auto [slots, valid] = batch_slots(batch, pool.block_size(), S);
  at::Tensor KR = pool.read_k_rope(layer, slots, dtype);                       // [B, S, g, 2r]
  at::Tensor C = pool.read_latent(layer, slots, dtype);                        // [B, S, R]
  at::Tensor img = pool.read_modality(slots).view({B, 1, S});                  // [B, 1, S]
  at::Tensor s = absorbed_scores(q_rope, q_latent, KR, C, img) * scale;
  at::Tensor p = at::softmax(s.masked_fill(valid.view({B, 1, S}).logical_not(), -INFINITY), -1);  // [B, h, S]
  return modality_sums(p, C, img);  // [B, h, 2, R]
}

DenseBf16Copy dense_bf16_copy(const LatentPool& pool, int64_t layer, const PagedBatch& batch) {
  const int64_t B = batch.block_table.size(0), max_blocks = batch.block_table.size(1), bs = pool.block_size();
  const int64_t S = max_blocks * bs;
  at::Tensor slots = position_slots(batch.block_table, bs, S);  // [B, S]; past seq_end: never attended
  DenseBf16Copy d;
  d.k_rope = pool.read_k_rope(layer, slots, at::kBFloat16).reshape({B * max_blocks, bs, pool.kv_heads(), pool.rope_dim()});
  d.latent = pool.read_latent(layer, slots, at::kBFloat16).reshape({B * max_blocks, bs, pool.latent_dim()});
  d.is_image = pool.read_modality(slots).to(at::kByte).reshape({B * max_blocks, bs});
  d.block_table = at::arange(B * max_blocks, batch.block_table.options().dtype(at::kInt)).view({B, max_blocks});
  return d;
}

MlaDecodeParams DenseBf16Copy::params(MlaDecodeParams p) const {
  p.rope_format = KvFormat::BF16;
  p.latent_format = KvFormat::BF16;
  p.k_rope = k_rope.data_ptr();
  p.k_rope_scale = nullptr;
  p.latent = latent.data_ptr();
  p.latent_scale = nullptr;
  p.is_image = is_image.data_ptr<uint8_t>();
  p.block_table = block_table.data_ptr<int32_t>();
  p.max_blocks = int32_t(block_table.size(1));
  p.num_blocks = int32_t(k_rope.size(0));
  return p;
}

at::Tensor mla_decode(const LatentPool& pool, int64_t layer, const at::Tensor& q_rope, const at::Tensor& q_latent,
                      const PagedBatch& batch, double scale, at::Tensor* lse) {
  check_decode_args(pool, q_rope, q_latent, batch);
  const int64_t B = q_rope.size(0), h = q_rope.size(1);
  at::Tensor qr = q_rope.to(at::kFloat).contiguous(), ql = q_latent.to(at::kFloat).contiguous();
  at::Tensor table = batch.block_table.to(at::kInt).contiguous();
  at::Tensor begin = batch.seq_begin.to(at::kInt).contiguous(), end = batch.seq_end.to(at::kInt).contiguous();
  at::Tensor out = at::empty({B, h, 2, pool.latent_dim()}, qr.options());
  MlaDecodeParams p = pool.kernel_params(layer);
  p.batch = int32_t(B);
  p.heads = int32_t(h);
  p.max_blocks = int32_t(table.size(1));
  p.scale = float(scale);
  p.q_rope = qr.data_ptr<float>();
  p.q_latent = ql.data_ptr<float>();
  p.block_table = table.data_ptr<int32_t>();
  p.seq_begin = begin.data_ptr<int32_t>();
  p.seq_end = end.data_ptr<int32_t>();
  p.out = out.data_ptr<float>();
  if (lse != nullptr) {
    *lse = at::empty({B, h, 2}, qr.options());
    p.lse = lse->data_ptr<float>();
  }
  if (pool.device().is_cpu()) {
    mla_decode_cpu(p);
    return out;
  }
#ifdef MLAFORGE_WITH_CUDA
  // A quantized cache that only the CUDA-core kernel takes while its bf16 twin would run the two-pass kernels
  // (Int8/Int4 latents too wide for one CTA, where the two-pass kernels cannot read them quantized: see
  // DenseBf16Copy; the CUDA-core kernel is ~40x slower at llava-1.5-7b's latent 1024) is decoded over a bf16
  // copy of what the step attends (transient: one layer at a time). F32 parts keep the exact CUDA-core kernel.
  DenseBf16Copy dense;
  if ((quantized(p.rope_format) || quantized(p.latent_format)) && p.rope_format != KvFormat::F32 &&
      p.latent_format != KvFormat::F32) {
    MlaDecodeParams as_bf16 = p;
    as_bf16.rope_format = as_bf16.latent_format = KvFormat::BF16;
    if (mla_decode_cuda_kernel(p) == MlaCudaKernel::CudaCore && mla_decode_cuda_kernel(as_bf16) == MlaCudaKernel::TwoPass) {
      dense = dense_bf16_copy(pool, layer, batch);
      p = dense.params(p);
    }
  }
  at::Tensor workspace = at::empty({mla_decode_cuda_workspace_bytes(p)}, qr.options().dtype(at::kByte));
  mla_decode_cuda(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  return out;
#else
  fail("mla decode", "this build has no CUDA kernels (configure with -DMLAFORGE_CUDA=ON)");
#endif
}

at::Tensor mla_decode_window(const LatentPool& pool, int64_t layer, const at::Tensor& q_rope, const at::Tensor& q_latent,
                             const PagedBatch& batch, double scale, const DecodeWindow& window) {
  at::Tensor lse;
  at::Tensor out = mla_decode(pool, layer, q_rope, q_latent, batch, scale, &lse);  // [B, h, 2, R], [B, h, 2]
  const int64_t B = q_rope.size(0), g = pool.kv_heads();
  const int64_t W = window.latent.size(1);
  check(window.rope.dim() == 4 && window.rope.size(0) == B && window.rope.size(1) == W && window.rope.size(2) == g &&
            window.latent.dim() == 3 && window.latent.size(0) == B && window.img.sizes() == window.valid.sizes() &&
            window.img.size(0) == B && window.img.size(1) == W,
        "mla decode", "window tensors do not match the batch of ", B, " and ", g, " KV heads");
  // Window scores in the kernel's units (base 2): s = scale * log2(e) * (q_rope . k_rope + q_m(t) . c_t).
  at::Tensor c = window.latent.to(at::kFloat);  // [B, W, R]
  at::Tensor img = window.img.view({B, 1, W});
  at::Tensor s = absorbed_scores(q_rope.to(at::kFloat), q_latent.to(at::kFloat), window.rope.to(at::kFloat), c, img) *
                 (scale * 1.4426950408889634);
  s = s.masked_fill(window.valid.view({B, 1, W}).logical_not(), -INFINITY);
  // Merge: out = (2^(m_k - M) l_k out_k + sum_t 2^(s_t - M) c_t) / (2^(m_k - M) l_k + sum_t 2^(s_t - M)).
  at::Tensor m_k = lse.select(-1, 0).unsqueeze(-1), l_k = lse.select(-1, 1).unsqueeze(-1);  // [B, h, 1]
  at::Tensor M = at::maximum(std::get<0>(s.max(-1, true)), m_k);
  M = at::where(at::isinf(M), at::zeros_like(M), M);  // a sequence without any token: everything 0
  at::Tensor p = at::exp2(s - M);                      // [B, h, W]
  at::Tensor w_k = at::exp2(m_k - M) * l_k;            // [B, h, 1]
  at::Tensor out_w = modality_sums(p, c, img);  // [B, h, 2, R]
  at::Tensor denom = (w_k + p.sum(-1, true)).clamp_min(1e-30).unsqueeze(-1);
  return (out * w_k.unsqueeze(-1) + out_w) / denom;
}

}  // namespace mlaforge
