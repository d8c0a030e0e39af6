// Low-rank KV factorisation (DESIGN.md section 2): W = [W_k_nope; W_v] ~= W_up W_down, chosen to minimise
// the output activation error E_m ||W x - W_up W_down x||^2 under each modality's input second moment S_m.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace mlaforge {

// Whitened: SVD of W L with S = L L^T (activation-aware). Svd: plain SVD of W (L = I, ignores S; ablation).
enum class LowRankMethod { Whitened, Svd };
// Joint: one latent for the stacked K/V rows. Split: separate key and value latents, latent = [c_k | c_v].
enum class KvLatent { Joint, Split };

// Uncentered second moment of the attention input of one modality: gram = sum_t x_t x_t^T [d, d] (float64
// preferred; any float dtype is accepted) over `count` tokens, so S = gram / count. `gram` may be undefined
// when count == 0.
struct ModalityGram {
  at::Tensor gram;
  int64_t count = 0;
};

struct LowRankOptions {
  LowRankMethod method = LowRankMethod::Whitened;
  KvLatent kv = KvLatent::Joint;
  bool decoupled = true;  // one (up, down) pair per modality, each whitened with its own S_m
  int64_t rank = 0;       // latent width R, 1..full_rank(); even for Split when there are key rows
  // Whitened only: factorise with S + ridge * mean(diag S) * I. 0 is the pure activation-aware
  // objective; larger values move towards plain SVD, keeping directions the calibration data rarely
  // visits (inputs unlike the calibration set, e.g. text-only prompts when most rows have images).
  double ridge = 0.0;
};

// One factor pair: down [R, d], up [rows, R], float64. c = down x; W x ~= up c.
struct Factors {
  at::Tensor down, up;
};

struct LowRankResult {
  Factors image, text;  // the same tensors when not decoupled (or for Svd, which ignores S)
  // Split only: widths of c_k and c_v (latent = [c_k | c_v], key rows of `up` use only the first key_rank
  // columns). R/2 each unless one side's full rank is smaller, in which case the rest goes to the other side;
  // with no key rows everything goes to values. Joint: both 0.
  int64_t key_rank = 0, value_rank = 0;
  // Relative output error per modality: tr(E S_m E^T) / tr(W S_m W^T), E = W - up_m down_m, with the
  // undamped S_m = gram_m / count_m and each modality measured with the factors its tokens use; key_/value_
  // restrict E and W to the key rows / value rows. 0 for a modality without tokens and for key_ errors when
  // there are no key rows.
  double rel_error_image = 0, rel_error_text = 0;
  double key_error_image = 0, key_error_text = 0;
  double value_error_image = 0, value_error_text = 0;
  // What was done to make S factorisable, e.g. "cholesky eps=1e-6" or "eigh fallback (clamped 3
  // eigenvalues)"; prefixed "image: ...; text: ..." when decoupled; "none (svd)" for Svd.
  std::string damping;
};

// Largest useful latent width: min(rows, d) for Joint; min(k_rows, d) + min(rows - k_rows, d) for Split.
int64_t full_rank(int64_t rows, int64_t k_rows, int64_t d, KvLatent kv);

// W [rows, d] (any float dtype): first k_rows rows are key-nope rows (all KV heads), the rest value rows.
// Works in float64 and returns float64. Throws Error("<where>: ...") on bad ranks, shapes or missing tokens.
// At R = full rank, up * down reproduces W to float64 precision for every option (damping keeps L invertible).
LowRankResult factorize_kv(const at::Tensor& W, int64_t k_rows, const ModalityGram& image, const ModalityGram& text,
                           const LowRankOptions& opt, const std::string& where = "low-rank KV");

}  // namespace mlaforge
