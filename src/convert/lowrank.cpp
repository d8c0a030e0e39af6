// Low-rank KV factorisation; see lowrank.h and DESIGN.md section 2.
//
// Why whitening: with S = L L^T, E ||(W - M) x||^2 = tr((W - M) S (W - M)^T) = ||(W - M) L||_F^2, so the best
// rank-R M is (best rank-R approximation of W L) L^-1 (Eckart-Young), i.e. U_R Sigma_R V_R^T L^-1.
#include "convert/lowrank.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "core/error.h"

namespace mlaforge {
namespace {

using at::Tensor;

constexpr int kFirstEpsExp = 6;  // damping eps starts at 1e-6 ...
constexpr int kLastEpsExp = 1;   // ... and grows by 10x up to 1e-1, then the eigendecomposition fallback
constexpr double kEpsMax = 1e-1;

// S = L L^T for a symmetric (damped) S [d, d]. L is either the lower Cholesky factor or Q diag(sqrt(e)).
struct Whitener {
  Tensor L;            // [d, d]
  Tensor Q, inv_sqrt;  // eigh fallback only: L^-1 = diag(inv_sqrt) Q^T; Q [d, d], inv_sqrt [d]
  std::string how;

  // X L^-1 for X [r, d], without forming L^-1 (triangular solve of Y L = X, or X diag(1/sqrt e) Q^T).
  Tensor times_inverse(const Tensor& X) const {
    if (!Q.defined()) return at::linalg_solve_triangular(L, X, /*upper=*/false, /*left=*/false);
    return (X * inv_sqrt.unsqueeze(0)).matmul(Q.t());
  }
};

Whitener whiten(const Tensor& S_in, const std::string& where, const std::string& modality, double ridge) {
  const int64_t d = S_in.size(0);
  const double mean_diag = S_in.diagonal().mean().item<double>();
  check(mean_diag > 0 && std::isfinite(mean_diag), where, "the ", modality,
        " second moment has non-positive trace (all-zero activations?)");
  const Tensor eye = at::eye(d, S_in.options());
  const Tensor S = ridge > 0 ? S_in + eye * (ridge * mean_diag) : S_in;
  // Damping relative to mean(diag S) bounds cond(S + lambda I) by about d / eps, which is what keeps the
  // full-rank product exact for singular S (fewer tokens than d, dead channels).
  for (int e = kFirstEpsExp; e >= kLastEpsExp; --e) {
    const double eps = std::pow(10.0, -e);
    Tensor L, info;
    std::tie(L, info) = at::linalg_cholesky_ex(S + eye * (eps * mean_diag));
    if (info.item<int64_t>() == 0 && at::isfinite(L).all().item<bool>())
      return Whitener{L, Tensor(), Tensor(), str("cholesky eps=1e-", e)};
  }
  // Only reached for an indefinite S (not a Gram matrix, or badly corrupted by rounding).
  Tensor evals, Q;
  std::tie(evals, Q) = at::linalg_eigh(S);
  const double floor = kEpsMax * mean_diag;
  const int64_t clamped = (evals < floor).sum().item<int64_t>();
  const Tensor e = evals.clamp_min(floor);
  return Whitener{Q * e.sqrt().unsqueeze(0), Q, e.rsqrt(), str("eigh fallback (clamped ", clamped, " eigenvalues)")};
}

// Best rank-k factorisation of Wb [r, d] under the whitener (or plain SVD when w is null):
// down [k, d] = Sigma_k^(1/2) V_k^T L^-1, up [r, k] = U_k Sigma_k^(1/2). Splitting Sigma evenly keeps both
// factors at similar scale for the later cast to half precision.
Factors truncated(const Tensor& Wb, const Whitener* w, int64_t k) {
  const Tensor A = w ? Wb.matmul(w->L) : Wb;
  Tensor U, s, Vh;
  std::tie(U, s, Vh) = at::linalg_svd(A, /*full_matrices=*/false);
  const Tensor sq = s.narrow(0, 0, k).sqrt();
  const Tensor up = U.narrow(1, 0, k) * sq.unsqueeze(0);
  Tensor down = sq.unsqueeze(1) * Vh.narrow(0, 0, k);
  if (w) down = w->times_inverse(down);
  return Factors{down.contiguous(), up.contiguous()};
}

double ratio(double num, double den) { return den > 0 ? num / den : 0.0; }

// Symmetrised float64 gram; checks shape and finiteness. Undefined result when the modality has no tokens.
Tensor checked_gram(const ModalityGram& g, int64_t d, const std::string& where, const std::string& modality) {
  check(g.count >= 0, where, modality, " token count is negative (", g.count, ")");
  if (!g.gram.defined()) {
    check(g.count == 0, where, modality, " has ", g.count, " tokens but no Gram matrix");
    return Tensor();
  }
  check(g.gram.dim() == 2 && g.gram.size(0) == d && g.gram.size(1) == d, where, modality, " Gram has shape ",
        g.gram.sizes(), ", expected [", d, ", ", d, "]");
  check(g.gram.is_floating_point(), where, modality, " Gram is not a floating-point tensor");
  const Tensor G = g.gram.to(at::kDouble);
  check(at::isfinite(G).all().item<bool>(), where, modality, " Gram has non-finite entries");
  if (g.count == 0) return Tensor();
  return (G + G.t()) * 0.5;
}

}  // namespace

int64_t full_rank(int64_t rows, int64_t k_rows, int64_t d, KvLatent kv) {
  if (kv == KvLatent::Joint) return std::min(rows, d);
  return std::min(k_rows, d) + std::min(rows - k_rows, d);
}

LowRankResult factorize_kv(const at::Tensor& W_in, int64_t k_rows, const ModalityGram& image, const ModalityGram& text,
                           const LowRankOptions& opt, const std::string& where) {
  check(W_in.defined() && W_in.dim() == 2, where, "KV weight must be a 2-D [rows, d] tensor");
  check(W_in.is_floating_point(), where, "KV weight is not a floating-point tensor");
  const int64_t rows = W_in.size(0), d = W_in.size(1);
  check(rows > 0 && d > 0, where, "KV weight has empty shape ", W_in.sizes());
  check(k_rows >= 0 && k_rows < rows, where, "key rows ", k_rows, " out of range for a KV weight of ", rows,
        " rows (need 0 <= key rows < rows: value rows must exist)");
  const Tensor W = W_in.to(at::kDouble).contiguous();  // [rows, d]
  check(at::isfinite(W).all().item<bool>(), where, "KV weight has non-finite entries");

  const Tensor G_img = checked_gram(image, d, where, "image");
  const Tensor G_txt = checked_gram(text, d, where, "text");

  const int64_t R = opt.rank, full = full_rank(rows, k_rows, d, opt.kv);
  check(R > 0, where, "latent rank must be positive, got ", R);
  check(R <= full, where, "latent rank ", R, " exceeds the full rank ", full, " of the ", rows, "x", d, " KV weight",
        opt.kv == KvLatent::Split ? " (split K/V)" : "");
  const bool split = opt.kv == KvLatent::Split;
  check(!(split && k_rows > 0 && R % 2 != 0), where, "split K/V latent needs an even rank, got ", R);

  const bool whitened = opt.method == LowRankMethod::Whitened;
  if (whitened && opt.decoupled) {
    check(image.count > 0, where, "decoupled whitening needs image calibration tokens, got 0");
    check(text.count > 0, where, "decoupled whitening needs text calibration tokens, got 0");
  } else if (whitened) {
    check(image.count > 0 || text.count > 0, where, "whitening needs calibration tokens, got 0 image and 0 text");
  }

  // Undamped second moments, used both for whitening and for the reported errors.
  const Tensor S_img = G_img.defined() ? G_img / static_cast<double>(image.count) : Tensor();
  const Tensor S_txt = G_txt.defined() ? G_txt / static_cast<double>(text.count) : Tensor();

  LowRankResult res;
  // Rank split between keys and values: R/2 each, overflow to the other side when one side is narrower.
  int64_t rk = 0, rv = R;
  if (split && k_rows > 0) {
    const int64_t fk = std::min(k_rows, d), fv = std::min(rows - k_rows, d);
    rk = R / 2;
    rv = R - rk;
    if (rk > fk) {
      rv += rk - fk;
      rk = fk;
    }
    if (rv > fv) {
      rk += rv - fv;
      rv = fv;
    }
  }
  if (split) {
    res.key_rank = rk;
    res.value_rank = rv;
  }

  // One factor pair under one whitener (null: plain SVD).
  auto factor = [&](const Whitener* w) {
    if (!split) return truncated(W, w, R);
    const Factors v = truncated(W.narrow(0, k_rows, rows - k_rows), w, rv);  // [rv, d], [rows-k, rv]
    if (rk == 0) return v;                                                   // k_rows == 0: the value block is all of W
    const Factors k = truncated(W.narrow(0, 0, k_rows), w, rk);              // [rk, d], [k_rows, rk]
    // Block-diagonal up: key rows read only c_k = latent[:rk], value rows only c_v = latent[rk:].
    Tensor up = at::zeros({rows, R}, W.options());
    up.narrow(0, 0, k_rows).narrow(1, 0, rk).copy_(k.up);
    up.narrow(0, k_rows, rows - k_rows).narrow(1, rk, rv).copy_(v.up);
    return Factors{at::cat({k.down, v.down}, 0), up};
  };

  if (!whitened) {
    res.image = res.text = factor(nullptr);
    res.damping = "none (svd)";
  } else if (opt.decoupled) {
    const Whitener wi = whiten(S_img, where, "image", opt.ridge), wt = whiten(S_txt, where, "text", opt.ridge);
    res.image = factor(&wi);
    res.text = factor(&wt);
    res.damping = "image: " + wi.how + "; text: " + wt.how;
  } else {
    // Token-weighted pooled second moment: (G_img + G_txt) / (n_img + n_txt).
    Tensor G;
    if (G_img.defined()) G = G_img;
    if (G_txt.defined()) G = G.defined() ? G + G_txt : G_txt;
    const Whitener w = whiten(G / static_cast<double>(image.count + text.count), where, "pooled", opt.ridge);
    res.image = res.text = factor(&w);
    res.damping = w.how;
  }

  // Reported errors, each modality with the factors its tokens use and its own undamped S. Per-row quadratic
  // forms (E S E^T)_ii [rows] are computed once and summed over all / key / value rows.
  auto measure = [&](const Factors& f, const Tensor& S, double& all, double& key, double& value) {
    if (!S.defined()) return;
    const Tensor E = W - f.up.matmul(f.down);                                   // [rows, d]
    const Tensor qe = (E.matmul(S) * E).sum(1), qw = (W.matmul(S) * W).sum(1);  // [rows]
    auto part = [&](const Tensor& q, int64_t from, int64_t n) { return q.narrow(0, from, n).sum().item<double>(); };
    all = ratio(qe.sum().item<double>(), qw.sum().item<double>());
    if (k_rows > 0) key = ratio(part(qe, 0, k_rows), part(qw, 0, k_rows));
    value = ratio(part(qe, k_rows, rows - k_rows), part(qw, k_rows, rows - k_rows));
  };
  measure(res.image, S_img, res.rel_error_image, res.key_error_image, res.value_error_image);
  measure(res.text, S_txt, res.rel_error_text, res.key_error_text, res.value_error_text);
  return res;
}

}  // namespace mlaforge
