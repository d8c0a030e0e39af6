// Probe of the wgmma shared-memory descriptors for the 128-byte-swizzled layout the row-pair kernel uses
// (sm_90a). A tile of 64 rows x 128 bf16 columns is stored as two halves of 64 columns; half h at h * 8192,
// row r at r * 128 within it, its 16-byte chunk c at ((c ^ (r % 8)) * 16) (Swizzle<3,4,3>, 1024-byte atoms).
// Checks against a host product, for every k-step:
//   K-major B (scores: N = 64 rows, K = 16 columns at column 16 ks): start + (ks / 4) * 8192 + (ks % 4) * 32,
//   SBO = 1024;
//   MN-major B (accumulation: K = rows 16 kk.., N = all 128 columns, transpose flag): start + kk * 2048, with
//   both assignments of the strides 8192 (next 64 columns) and 1024 (next 8 rows) to LBO / SBO.
// Prints which match (an earlier probe of the no-swizzle core-matrix layout found K-major LBO = K stride,
// SBO = N stride, and MN-major LBO = K stride, SBO = N stride).
//   nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -o /tmp/wgmma_probe bench/cuda/wgmma_probe.cu && /tmp/wgmma_probe
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int kRows = 64;
constexpr int kCols = 128;

__device__ uint64_t make_desc(const void* smem_ptr, int lbo, int sbo) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  uint64_t d = static_cast<uint64_t>((addr >> 4) & 0x3fff);
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3fff) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3fff) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // 128-byte swizzle
  return d;
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

#define ACC32(d, o)                                                                                         \
  "+f"(d[o + 0]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]), \
      "+f"(d[o + 7]), "+f"(d[o + 8]), "+f"(d[o + 9]), "+f"(d[o + 10]), "+f"(d[o + 11]), "+f"(d[o + 12]),            \
      "+f"(d[o + 13]), "+f"(d[o + 14]), "+f"(d[o + 15]), "+f"(d[o + 16]), "+f"(d[o + 17]), "+f"(d[o + 18]),         \
      "+f"(d[o + 19]), "+f"(d[o + 20]), "+f"(d[o + 21]), "+f"(d[o + 22]), "+f"(d[o + 23]), "+f"(d[o + 24]),         \
      "+f"(d[o + 25]), "+f"(d[o + 26]), "+f"(d[o + 27]), "+f"(d[o + 28]), "+f"(d[o + 29]), "+f"(d[o + 30]),         \
      "+f"(d[o + 31])

// mode 0: D[64 x 64] = A[64 x 16] . tile[0..63, 16 ks..]^T (K-major); mode 1: D[64 x 128] = A . tile[16 ks.., :]
// (MN-major).
__global__ void probe(const float* a, const __nv_bfloat16* tile, float* d, int mode, int lbo, int sbo, int ks) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const int tid = threadIdx.x;
  for (int i = tid; i < kRows * kCols / 8; i += 128) {
    const int r = i / (kCols / 8), chunk = i % (kCols / 8), h = chunk / 8, c = chunk % 8;
    memcpy(smem + h * 8192 + r * 128 + ((c ^ (r % 8)) * 16), tile + r * kCols + chunk * 8, 16);
  }
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const int r0 = 16 * warp + g;
  uint32_t af[4];
  af[0] = pack(a[r0 * 16 + 2 * q], a[r0 * 16 + 2 * q + 1]);
  af[1] = pack(a[(r0 + 8) * 16 + 2 * q], a[(r0 + 8) * 16 + 2 * q + 1]);
  af[2] = pack(a[r0 * 16 + 2 * q + 8], a[r0 * 16 + 2 * q + 9]);
  af[3] = pack(a[(r0 + 8) * 16 + 2 * q + 8], a[(r0 + 8) * 16 + 2 * q + 9]);
  float acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  if (mode == 0) {
    const uint64_t desc = make_desc(smem + (ks / 4) * 8192 + (ks % 4) * 32, lbo, sbo);
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,"
        "%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 0;\n"
        : ACC32(acc, 0)
        : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "l"(desc));
  } else {
    const uint64_t desc = make_desc(smem + ks * 2048, lbo, sbo);
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,"
        "%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,"
        "%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, 1, 1, 1, 1;\n"
        : ACC32(acc, 0), ACC32(acc, 32)
        : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "l"(desc));
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  const int n = mode == 0 ? 64 : 128;
  for (int nb = 0; nb < n / 8; ++nb) {
    const int col = 8 * nb + 2 * q;
    d[r0 * n + col] = acc[4 * nb];
    d[r0 * n + col + 1] = acc[4 * nb + 1];
    d[(r0 + 8) * n + col] = acc[4 * nb + 2];
    d[(r0 + 8) * n + col + 1] = acc[4 * nb + 3];
  }
}

float bf(float x) { return __bfloat162float(__float2bfloat16(x)); }

}  // namespace

int main() {
  std::vector<float> a(64 * 16), tile_f(kRows * kCols);
  std::vector<__nv_bfloat16> tile(kRows * kCols);
  uint32_t s = 12345;
  auto rnd = [&] { s = s * 1664525u + 1013904223u; return static_cast<float>((s >> 8) & 0xffff) / 32768.f - 1.f; };
  for (float& v : a) v = bf(rnd());
  for (int i = 0; i < kRows * kCols; ++i) {
    tile_f[i] = bf(rnd());
    tile[i] = __float2bfloat16(tile_f[i]);
  }
  float *da, *dd;
  __nv_bfloat16* dt;
  cudaMalloc(&da, a.size() * 4);
  cudaMalloc(&dd, 64 * 128 * 4);
  cudaMalloc(&dt, tile.size() * 2);
  cudaMemcpy(da, a.data(), a.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dt, tile.data(), tile.size() * 2, cudaMemcpyHostToDevice);
  cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, 32768);
  struct Try { int mode, lbo, sbo, ks; };
  std::vector<Try> tries;
  for (int ks = 0; ks < 8; ++ks) tries.push_back({0, 16, 1024, ks});
  for (int kk = 0; kk < 4; ++kk) tries.push_back({1, 8192, 1024, kk});
  for (int kk = 0; kk < 4; ++kk) tries.push_back({1, 1024, 8192, kk});
  int mn_ok[2] = {0, 0};
  for (const Try& t : tries) {
    const int n = t.mode == 0 ? 64 : 128;
    cudaMemset(dd, 0, 64 * 128 * 4);
    probe<<<1, 128, 32768>>>(da, dt, dd, t.mode, t.lbo, t.sbo, t.ks);
    cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
      std::printf("%s k-step %d LBO=%d SBO=%d: %s (stopping)\n", t.mode == 0 ? "K-major " : "MN-major", t.ks, t.lbo, t.sbo,
                  cudaGetErrorString(err));
      return 1;
    }
    std::vector<float> d(64 * n);
    cudaMemcpy(d.data(), dd, d.size() * 4, cudaMemcpyDeviceToHost);
    double num = 0, den = 0;
    for (int m = 0; m < 64; ++m)
      for (int j = 0; j < n; ++j) {
        double ref = 0;
        for (int k = 0; k < 16; ++k) {
          const double b = t.mode == 0 ? tile_f[j * kCols + 16 * t.ks + k] : tile_f[(16 * t.ks + k) * kCols + j];
          ref += static_cast<double>(a[m * 16 + k]) * b;
        }
        num += (d[m * n + j] - ref) * (d[m * n + j] - ref);
        den += ref * ref;
      }
    const double rel = std::sqrt(num / den);
    const bool ok = rel < 1e-3;
    if (t.mode == 1) mn_ok[t.lbo == 8192 ? 0 : 1] += ok;
    std::printf("%s k-step %d LBO=%4d SBO=%4d: rel err %.2e %s\n", t.mode == 0 ? "K-major " : "MN-major", t.ks, t.lbo,
                t.sbo, rel, ok ? "MATCH" : "");
  }
  if (mn_ok[0] == 4) std::printf("MN_DESC -DMLAFORGE_RV_MN_LBO=8192 -DMLAFORGE_RV_MN_SBO=1024\n");
  if (mn_ok[1] == 4) std::printf("MN_DESC -DMLAFORGE_RV_MN_LBO=1024 -DMLAFORGE_RV_MN_SBO=8192\n");
  return 0;
}
