// Fused CPU flash attention (FlashAttention-2 forward and backward) for attnjax's `cpu_flash`
// implementation of `flex_attention`, as XLA FFI handlers:
//
//   attnjax_flash_fwd(q, k, v, pnum, pidx, fnum, fidx, mask; scale, block_q, block_kv) -> out, lse
//   attnjax_flash_bwd(q, k, v, out, lse, dout, dlse, pnum, pidx, fnum, fidx, mask;
//                     scale, block_q, block_kv) -> dq, dk, dv
//
// Shapes (float32 unless said): q [B,T,N,H], k [B,S,K,H], v [B,S,K,h], out [B,T,N,h], lse [B,T,N]
// (-inf and zero output for a row with no visible key). The block lists are a `BlockMask`'s,
// unioned over heads (int32): pnum/fnum [Bl,nq] partial/full key-block counts of each query block,
// pidx [Bl,nq,P] / fidx [Bl,nq,F] their indices (Bl in {1, B}). `mask` [Bm,Nm,nq,P,bq,bk] (bool,
// Bm in {1, B}, Nm in {1, N}) is the elementwise mask of each partial tile, evaluated in JAX; full
// tiles are unmasked. Keys at or past S are hidden; T and S need not be multiples of the tiles.
//
// Scores are kept in base-2 units (q pre-scaled by scale·log2 e) so that the softmax is one
// exp2 per score. Work runs on XLA's intra-op thread pool (the calling thread takes part):
// forward over (batch, head, query block); backward over (batch, kv head, kv-block class mod C),
// each item owning its dk/dv rows and a private dq buffer that is summed in a fixed order, so the
// result does not depend on the schedule.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Vectors (GCC vector extensions: the ISA comes from -march)

#if defined(__AVX512F__)
constexpr int VW = 16;       // floats per vector
constexpr int MR = 6;        // rows of a register block
constexpr int NV = 4;        // vectors of a register block
#else
constexpr int VW = 8;
constexpr int MR = 6;
constexpr int NV = 2;
#endif
constexpr int KC = 64;       // keys per inner chunk (a multiple of VW)
constexpr int RQ = 48;       // query rows per inner block
static_assert(KC % VW == 0, "KC must be a multiple of the vector width");

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef int8_t vb __attribute__((vector_size(VW)));

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline vi iota() { vi v; for (int i = 0; i < VW; ++i) v[i] = i; return v; }

#if defined(__AVX512F__)
inline float hmax(vf v) { return _mm512_reduce_max_ps((__m512)v); }
inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
inline bool any_greater(vf v, float t) {
  return _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(t), _CMP_GT_OQ) != 0;
}
#else
inline float hmax(vf v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
inline float hsum(vf v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
inline bool any_greater(vf v, float t) {
  return _mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_set1_ps(t), _CMP_GT_OQ)) != 0;
}
#endif

// 2^x for x <= 0 (Cephes exp2f polynomial on [-1/2, 1/2], relative error ~2e-7); 0 below -126.
inline vf exp2v(vf x) {
  const vf lo = splat(-126.5f);
  vf xc = x < lo ? lo : x;
  const vf magic = splat(12582912.f);              // 1.5·2^23: round to nearest integer
  vf t = xc + magic;
  vf n = t - magic;
  vf f = xc - n;
  vf p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  vi ni, pi;
  std::memcpy(&ni, &t, sizeof ni);
  std::memcpy(&pi, &p, sizeof pi);
  ni = ni - 0x4B400000;                            // the integer n, from the bits of t
  pi = pi + (ni << 23);
  vf r;
  std::memcpy(&r, &pi, sizeof r);
  return x < lo ? splat(0.f) : r;
}

// Bytes (bool) -> lane mask of nonzero.
inline vi mask_lanes(const bool* m) {
  vb b;
  std::memcpy(&b, m, sizeof b);
  return __builtin_convertvector(b, vi) != 0;
}

// ---------------------------------------------------------------------------------------------
// GEMM: C[M x Nc] (+)= A[M x Kd] · B[Kd x Nc], Nc a multiple of VW; A(r, k) = A[r·ars + k·aks]
// (any strides: plain or transposed), B and C row-major.

template <int M, int V, bool ACC>
inline void micro(int kd, const float* __restrict A, ptrdiff_t ars, ptrdiff_t aks,
                  const float* __restrict B, ptrdiff_t ldb, float* __restrict C, ptrdiff_t ldc) {
  vf c[M][V];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) c[r][v] = ACC ? load(C + r * ldc + v * VW) : splat(0.f);
  for (int kk = 0; kk < kd; ++kk) {
    vf b[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) b[v] = load(B + kk * ldb + v * VW);
    const float* a = A + kk * aks;
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      vf ar = splat(a[r * ars]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) c[r][v] += ar * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) store(C + r * ldc + v * VW, c[r][v]);
}

template <int M, bool ACC>
inline void micro_rows(int nv, int kd, const float* A, ptrdiff_t ars, ptrdiff_t aks, const float* B,
                       ptrdiff_t ldb, float* C, ptrdiff_t ldc) {
  static_assert(NV <= 4, "extend the switch");
  switch (nv) {
    case 4: if constexpr (NV >= 4) micro<M, 4, ACC>(kd, A, ars, aks, B, ldb, C, ldc); break;
    case 3: if constexpr (NV >= 3) micro<M, 3, ACC>(kd, A, ars, aks, B, ldb, C, ldc); break;
    case 2: micro<M, 2, ACC>(kd, A, ars, aks, B, ldb, C, ldc); break;
    default: micro<M, 1, ACC>(kd, A, ars, aks, B, ldb, C, ldc); break;
  }
}

template <bool ACC>
void gemm(int M, int Nc, int kd, const float* A, ptrdiff_t ars, ptrdiff_t aks, const float* B,
          ptrdiff_t ldb, float* C, ptrdiff_t ldc) {
  static_assert(MR <= 8, "extend the switch");
  for (int n0 = 0; n0 < Nc; n0 += NV * VW) {
    const int nv = std::min(NV, (Nc - n0) / VW);
    const float* Bn = B + n0;
    float* Cn = C + n0;
    int m0 = 0;
    for (; m0 + MR <= M; m0 += MR)
      micro_rows<MR, ACC>(nv, kd, A + m0 * ars, ars, aks, Bn, ldb, Cn + m0 * ldc, ldc);
    const float* Am = A + m0 * ars;
    float* Cm = Cn + m0 * ldc;
    switch (M - m0) {
      case 7: if constexpr (MR > 7) micro_rows<7, ACC>(nv, kd, Am, ars, aks, Bn, ldb, Cm, ldc); break;
      case 6: if constexpr (MR > 6) micro_rows<6, ACC>(nv, kd, Am, ars, aks, Bn, ldb, Cm, ldc); break;
      case 5: if constexpr (MR > 5) micro_rows<5, ACC>(nv, kd, Am, ars, aks, Bn, ldb, Cm, ldc); break;
      case 4: if constexpr (MR > 4) micro_rows<4, ACC>(nv, kd, Am, ars, aks, Bn, ldb, Cm, ldc); break;
      case 3: if constexpr (MR > 3) micro_rows<3, ACC>(nv, kd, Am, ars, aks, Bn, ldb, Cm, ldc); break;
      case 2: if constexpr (MR > 2) micro_rows<2, ACC>(nv, kd, Am, ars, aks, Bn, ldb, Cm, ldc); break;
      case 1: micro_rows<1, ACC>(nv, kd, Am, ars, aks, Bn, ldb, Cm, ldc); break;
      default: break;
    }
  }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Work sharing on XLA's intra-op pool. The caller claims items too, and waits only for items that
// some running thread has claimed, so it never waits on a helper that has not started (no deadlock
// when the pool is busy); helpers that start late find nothing left.

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

// Claims and runs items until none is left. `f` is touched only for a claimed item, which the
// caller of `parallel_for` waits for, so a helper that starts late never sees a dead `f`.
template <class F>
void work(const std::shared_ptr<Shared>& st, int64_t n, const F* f) {
  for (;;) {
    const int64_t i = st->next.fetch_add(1);
    if (i >= n) return;
    (*f)(i);
    if (st->done.fetch_add(1) + 1 == n) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  }
}

// Runs f(0..n-1) on the calling thread and up to num_threads - 1 helpers from the pool.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  if (n <= 0) return;
  auto st = std::make_shared<Shared>();
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([st, n, fp = &f]() { work(st, n, fp); });
  work(st, n, &f);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

// ---------------------------------------------------------------------------------------------
// Problem description shared by both passes.

struct Dims {
  int B, T, S, N, K, G, H, hv;      // hv: value head dim
  int bq, bk, nq, nkv, P, F;        // tiles, query / key blocks, list widths
  int Bl, Bm, Nm;                   // leading dims of the lists and of the mask
  int Hp, hp;                       // head dims padded to whole vectors
};

struct Lists {
  const int32_t* pnum;
  const int32_t* pidx;
  const int32_t* fnum;
  const int32_t* fidx;
  const bool* mask;
};

const bool* tile_mask(const Dims& d, const Lists& L, int b, int n, int i, int t) {
  const int bm = d.Bm == 1 ? 0 : b, nm = d.Nm == 1 ? 0 : n;
  return L.mask + ((((int64_t)bm * d.Nm + nm) * d.nq + i) * d.P + t) * (int64_t)d.bq * d.bk;
}

// Lanes [c, c + VW) of a chunk row that are visible: inside the chunk's `nk` keys and, for a
// partial tile, set in its mask row `m` (null: unmasked).
inline vi visible_lanes(const bool* m, int c, int nk) {
  vi keep = (iota() + c) < nk;
  if (m != nullptr) {
    if (c + VW <= nk) {
      keep = keep & mask_lanes(m + c);
    } else {
      vi mk{};
      for (int e = 0; e < VW && c + e < nk; ++e) mk[e] = m[c + e] ? -1 : 0;
      keep = keep & mk;
    }
  }
  return keep;
}

// Tiled k / v (transposed): for key tile j and chunk c (keys j·bk + c·kcw + e, e < kcw), a
// contiguous [rows, kcw] block, zero past the tile and past S, so a chunk's rows stay close.
struct Tiled {
  int kcw, nch;              // chunk width (a multiple of VW, at most KC), chunks per key tile
  int64_t rows;              // H (k) or hv (v)
  int64_t block() const { return rows * kcw; }
  int64_t tile() const { return nch * block(); }
};

inline Tiled tiled(const Dims& d, int rows) {
  Tiled t;
  t.kcw = std::min(KC, round_up(d.bk, VW));
  t.nch = (d.bk + t.kcw - 1) / t.kcw;
  t.rows = rows;
  return t;
}

// Packs x [B,S,K,rows] of (b, kh) into the tiled transposed layout at `dst` (all nkv tiles).
void pack_tiled(const Dims& d, const Tiled& tl, const float* x, int b, int kh, float* dst) {
  for (int j = 0; j < d.nkv; ++j)
    for (int c = 0; c < tl.nch; ++c) {
      float* blk = dst + j * tl.tile() + c * tl.block();
      for (int e = 0; e < tl.kcw; ++e) {
        const int off = c * tl.kcw + e, s = j * d.bk + off;
        const bool ok = off < d.bk && s < d.S;
        const float* src = x + (((int64_t)b * d.S + s) * d.K + kh) * tl.rows;
        for (int64_t r = 0; r < tl.rows; ++r) blk[r * tl.kcw + e] = ok ? src[r] : 0.f;
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward

// Growth of a row's maximum (base 2) tolerated before the running maximum is updated and the row
// rescaled: weights stay at most 2^8, far inside float32's range, and most chunks skip both the
// horizontal maximum and the rescale.
constexpr float kMaxSlack = 8.f;

struct FwdBuffers {
  std::vector<float> kt;   // [B,K] tiled k transposed
  std::vector<float> vp;   // [B,K,S+KC,hp] v, head dim padded with zeros
};

void pack_kv_forward(const Dims& d, const Tiled& tk, const float* k, const float* v, FwdBuffers& buf,
                     int64_t item) {
  const int b = item / d.K, kh = item % d.K;
  pack_tiled(d, tk, k, b, kh, buf.kt.data() + item * d.nkv * tk.tile());
  float* vp = buf.vp.data() + item * (int64_t)(d.S + KC) * d.hp;
  for (int s = 0; s < d.S + KC; ++s) {
    float* row = vp + (int64_t)s * d.hp;
    if (s < d.S) {
      std::memcpy(row, v + (((int64_t)b * d.S + s) * d.K + kh) * d.hv, sizeof(float) * d.hv);
      std::fill(row + d.hv, row + d.hp, 0.f);
    } else {
      std::fill(row, row + d.hp, 0.f);
    }
  }
}

// The `nk` value rows at `vc` as the chunk's `nr` query rows may read them: a key that the mask
// `m` (row stride bk) hides from every one of them may hold anything (an unused cache slot, even
// NaN), and its zero weight times NaN would be NaN, so such rows are read as zeros (copied to
// `buf`; `vc` itself when every key is seen by some row).
const float* hide_values(const Dims& d, const bool* m, int nr, int nk, const float* vc,
                         std::vector<float>& buf) {
  bool copied = false;
  for (int e = 0; e < nk; ++e) {
    bool seen = false;
    for (int r = 0; r < nr && !seen; ++r) seen = m[(int64_t)r * d.bk + e];
    if (seen && !copied) continue;
    if (!copied) {
      std::memcpy(buf.data(), vc, sizeof(float) * (size_t)nk * d.hp);
      copied = true;
    }
    if (!seen) std::fill(buf.data() + (size_t)e * d.hp, buf.data() + (size_t)(e + 1) * d.hp, 0.f);
  }
  return copied ? buf.data() : vc;
}

void forward_item(const Dims& d, const Tiled& tk, const Lists& L, float c_scale, const float* q,
                  const FwdBuffers& buf, float* out, float* lse, int64_t w) {
  const int i = d.nq - 1 - (int)(w / ((int64_t)d.B * d.N));   // heavy (late) query blocks first
  const int bn = (int)(w % ((int64_t)d.B * d.N));
  const int b = bn / d.N, n = bn % d.N, kh = n / d.G;
  const int bl = d.Bl == 1 ? 0 : b;
  const int row0 = i * d.bq, nrows = std::min(d.bq, d.T - row0);
  const int pn = L.pnum[(int64_t)bl * d.nq + i], fn = L.fnum[(int64_t)bl * d.nq + i];
  const int32_t* pidx = L.pidx + ((int64_t)bl * d.nq + i) * d.P;
  const int32_t* fidx = L.fidx + ((int64_t)bl * d.nq + i) * d.F;
  const float* kt = buf.kt.data() + ((int64_t)b * d.K + kh) * d.nkv * tk.tile();
  const float* vp = buf.vp.data() + ((int64_t)b * d.K + kh) * (int64_t)(d.S + KC) * d.hp;
  const int kcw = tk.kcw, nvk = kcw / VW;

  std::vector<float> qbuf((size_t)RQ * d.H), sbuf((size_t)RQ * KC), obuf((size_t)RQ * d.hp);
  std::vector<float> vbuf((size_t)KC * d.hp);
  float m[RQ];
  vf lv[RQ];

  for (int r0 = 0; r0 < nrows; r0 += RQ) {
    const int nr = std::min(RQ, nrows - r0);
    for (int r = 0; r < nr; ++r) {
      const float* src = q + (((int64_t)b * d.T + row0 + r0 + r) * d.N + n) * d.H;
      for (int x = 0; x < d.H; ++x) qbuf[(size_t)r * d.H + x] = src[x] * c_scale;
      m[r] = kNegInf;
      lv[r] = splat(0.f);
    }
    std::fill(obuf.begin(), obuf.end(), 0.f);
    for (int t = 0; t < pn + fn; ++t) {
      const bool partial = t < pn;
      const int j = partial ? pidx[t] : fidx[t - pn];
      const bool* tmask = partial ? tile_mask(d, L, b, n, i, t) : nullptr;
      const int j0 = j * d.bk, len = std::min(d.bk, d.S - j0);
      for (int c = 0; c < tk.nch && c * kcw < len; ++c) {
        const int c0 = c * kcw, nk = std::min(kcw, len - c0);
        const bool masked = tmask != nullptr || nk < kcw;
        gemm<false>(nr, kcw, d.H, qbuf.data(), d.H, 1, kt + j * tk.tile() + c * tk.block(), kcw,
                    sbuf.data(), kcw);
        for (int r = 0; r < nr; ++r) {
          float* srow = sbuf.data() + (size_t)r * kcw;
          const bool* mrow = tmask ? tmask + (int64_t)(r0 + r) * d.bk + c0 : nullptr;
          vf x[KC / VW];
          vf vmax = splat(kNegInf);
          for (int u = 0; u < nvk; ++u) {
            x[u] = load(srow + u * VW);
            if (masked) x[u] = visible_lanes(mrow, u * VW, nk) ? x[u] : splat(kNegInf);
            vmax = vmax > x[u] ? vmax : x[u];
          }
          float mr = m[r];
          if (mr == kNegInf || any_greater(vmax, mr + kMaxSlack)) {
            const float mnew = std::max(mr, hmax(vmax));
            if (mnew == kNegInf) {               // nothing visible in this row yet
              std::fill(srow, srow + kcw, 0.f);
              continue;
            }
            if (mr != kNegInf) {
              const vf alpha = splat(std::exp2(mr - mnew));
              float* o = obuf.data() + (size_t)r * d.hp;
              for (int e = 0; e < d.hp; e += VW) store(o + e, load(o + e) * alpha);
              lv[r] *= alpha;
            }
            m[r] = mr = mnew;
          }
          const vf mv = splat(mr);
          vf sum = lv[r];
          for (int u = 0; u < nvk; ++u) {
            const vf p = exp2v(x[u] - mv);
            store(srow + u * VW, p);
            sum += p;
          }
          lv[r] = sum;
        }
        const float* vc = vp + (int64_t)(j0 + c0) * d.hp;
        if (tmask != nullptr) vc = hide_values(d, tmask + (int64_t)r0 * d.bk + c0, nr, nk, vc, vbuf);
        gemm<true>(nr, d.hp, nk, sbuf.data(), kcw, 1, vc, d.hp, obuf.data(), d.hp);
      }
    }
    for (int r = 0; r < nr; ++r) {
      const int64_t row = ((int64_t)b * d.T + row0 + r0 + r) * d.N + n;
      float* dst = out + row * d.hv;
      const float* o = obuf.data() + (size_t)r * d.hp;
      const float l = hsum(lv[r]);
      if (m[r] == kNegInf || !(l > 0.f)) {
        std::fill(dst, dst + d.hv, 0.f);
        lse[row] = kNegInf;
      } else {
        const float inv = 1.f / l;
        for (int e = 0; e < d.hv; ++e) dst[e] = o[e] * inv;
        lse[row] = m[r] * kLn2 + std::log(l);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks

ffi::Error check_dims(Dims& d, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pnum, ffi::Buffer<ffi::S32> pidx,
                      ffi::Buffer<ffi::S32> fnum, ffi::Buffer<ffi::S32> fidx,
                      ffi::Buffer<ffi::PRED> mask, int64_t bq, int64_t bk) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto pd = pidx.dimensions(), fd = fidx.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("attnjax_flash: q, k, v must be rank 4");
  d.B = qd[0]; d.T = qd[1]; d.N = qd[2]; d.H = qd[3];
  d.S = kd[1]; d.K = kd[2]; d.hv = vd[3];
  if (kd[0] != d.B || vd[0] != d.B || kd[3] != d.H || vd[1] != d.S || vd[2] != d.K || d.K <= 0 ||
      d.N % d.K != 0)
    return ffi::Error::InvalidArgument("attnjax_flash: q [B,T,N,H], k [B,S,K,H], v [B,S,K,h] "
                                       "with K dividing N expected");
  d.G = d.N / d.K;
  d.bq = (int)bq; d.bk = (int)bk;
  if (bq <= 0 || bk <= 0) return ffi::Error::InvalidArgument("attnjax_flash: bad tile sizes");
  d.nq = (d.T + d.bq - 1) / d.bq;
  d.nkv = (d.S + d.bk - 1) / d.bk;
  if (pd.size() != 3 || fd.size() != 3 || md.size() != 6 || pnum.dimensions().size() != 2 ||
      fnum.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("attnjax_flash: bad block-list ranks");
  d.Bl = pd[0]; d.P = pd[2]; d.F = fd[2];
  d.Bm = md[0]; d.Nm = md[1];
  if ((d.Bl != 1 && d.Bl != d.B) || pd[1] != d.nq || fd[0] != d.Bl || fd[1] != d.nq ||
      pnum.dimensions()[0] != d.Bl || pnum.dimensions()[1] != d.nq ||
      fnum.dimensions()[0] != d.Bl || fnum.dimensions()[1] != d.nq)
    return ffi::Error::InvalidArgument("attnjax_flash: block lists do not match the tiles");
  if ((d.Bm != 1 && d.Bm != d.B) || (d.Nm != 1 && d.Nm != d.N) || md[2] != d.nq || md[3] != d.P ||
      md[4] != d.bq || md[5] != d.bk)
    return ffi::Error::InvalidArgument("attnjax_flash: mask must be [Bm,Nm,nq,P,block_q,block_kv]");
  d.Hp = round_up(d.H, VW);
  d.hp = round_up(d.hv, VW);
  // Every listed block index must be in range (a bad index would read out of bounds).
  const int64_t rows = (int64_t)d.Bl * d.nq;
  for (int64_t r = 0; r < rows; ++r) {
    const int pn = pnum.typed_data()[r], fn = fnum.typed_data()[r];
    if (pn < 0 || pn > d.P || fn < 0 || fn > d.F)
      return ffi::Error::InvalidArgument("attnjax_flash: block count out of range");
    for (int t = 0; t < pn; ++t) {
      const int j = pidx.typed_data()[r * d.P + t];
      if (j < 0 || j >= d.nkv) return ffi::Error::InvalidArgument("attnjax_flash: bad block index");
    }
    for (int t = 0; t < fn; ++t) {
      const int j = fidx.typed_data()[r * d.F + t];
      if (j < 0 || j >= d.nkv) return ffi::Error::InvalidArgument("attnjax_flash: bad block index");
    }
  }
  return ffi::Error::Success();
}

ffi::Error FlashFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pnum, ffi::Buffer<ffi::S32> pidx,
                    ffi::Buffer<ffi::S32> fnum, ffi::Buffer<ffi::S32> fidx,
                    ffi::Buffer<ffi::PRED> mask, float scale, int64_t block_q, int64_t block_kv,
                    ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (auto err = check_dims(d, q, k, v, pnum, pidx, fnum, fidx, mask, block_q, block_kv);
      !err.success())
    return err;
  Lists L{pnum.typed_data(), pidx.typed_data(), fnum.typed_data(), fidx.typed_data(),
          mask.typed_data()};
  if ((int64_t)d.B * d.T * d.N == 0) return ffi::Error::Success();
  const Tiled tk = tiled(d, d.H);
  FwdBuffers buf;
  buf.kt.resize((size_t)d.B * d.K * d.nkv * tk.tile());
  buf.vp.resize((size_t)d.B * d.K * (d.S + KC) * d.hp);
  const float* kp = k.typed_data();
  const float* vptr = v.typed_data();
  parallel_for(pool, (int64_t)d.B * d.K,
               [&](int64_t it) { pack_kv_forward(d, tk, kp, vptr, buf, it); });
  const float c = scale * kLog2e;
  const float* qp = q.typed_data();
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  parallel_for(pool, (int64_t)d.B * d.N * d.nq,
               [&](int64_t w) { forward_item(d, tk, L, c, qp, buf, op, lp, w); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2): for each key chunk, visit the query blocks that see it.

struct BwdBuffers {
  std::vector<float> qp;     // [B,N,T,Hp]   q · scale·log2 e
  std::vector<float> dop;    // [B,N,T,hp]   dout
  std::vector<float> lse2;   // [B,N,T]      lse·log2 e (0 where -inf)
  std::vector<float> delta;  // [B,N,T]      Σ dout·out - dlse
  std::vector<float> kp;     // [B,K,S+KC,Hp] k
  std::vector<float> kt;     // [B,K] tiled k transposed
  std::vector<float> vt;     // [B,K] tiled v transposed
  std::vector<float> dq;     // [C,B,N,T,Hp] one partial dq per key-block class
};

struct Visit {
  int i;       // query block
  int t;       // slot in its partial list, -1 for a full tile
};

ffi::Error FlashBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::F32> dlse,
                    ffi::Buffer<ffi::S32> pnum, ffi::Buffer<ffi::S32> pidx,
                    ffi::Buffer<ffi::S32> fnum, ffi::Buffer<ffi::S32> fidx,
                    ffi::Buffer<ffi::PRED> mask, float scale, int64_t block_q, int64_t block_kv,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto err = check_dims(d, q, k, v, pnum, pidx, fnum, fidx, mask, block_q, block_kv);
      !err.success())
    return err;
  Lists L{pnum.typed_data(), pidx.typed_data(), fnum.typed_data(), fidx.typed_data(),
          mask.typed_data()};
  const int B = d.B, T = d.T, S = d.S, N = d.N, K = d.K, G = d.G, H = d.H, hv = d.hv;
  const int Hp = d.Hp, hp = d.hp;
  float* dqo = dq->typed_data();
  float* dko = dk->typed_data();
  float* dvo = dv->typed_data();
  if ((int64_t)B * T * N == 0 || (int64_t)B * S * K == 0) {
    std::fill(dqo, dqo + (int64_t)B * T * N * H, 0.f);
    std::fill(dko, dko + (int64_t)B * S * K * H, 0.f);
    std::fill(dvo, dvo + (int64_t)B * S * K * hv, 0.f);
    return ffi::Error::Success();
  }
  // Key-block classes j mod C: enough items to share the work when B·K is small (a function of
  // the shapes only, so the dq summation order is fixed).
  const int C = std::max(1, std::min(d.nkv, (8 + B * K - 1) / (B * K)));

  // Transposed lists: for each (list row, key block), the query blocks that visit it.
  std::vector<std::vector<Visit>> visits((size_t)d.Bl * d.nkv);
  for (int bl = 0; bl < d.Bl; ++bl)
    for (int i = 0; i < d.nq; ++i) {
      const int64_t r = (int64_t)bl * d.nq + i;
      for (int t = 0; t < L.pnum[r]; ++t)
        visits[(size_t)bl * d.nkv + L.pidx[r * d.P + t]].push_back({i, t});
      for (int t = 0; t < L.fnum[r]; ++t)
        visits[(size_t)bl * d.nkv + L.fidx[r * d.F + t]].push_back({i, -1});
    }

  BwdBuffers buf;
  buf.qp.resize((size_t)B * N * T * Hp);
  buf.dop.resize((size_t)B * N * T * hp);
  buf.lse2.resize((size_t)B * N * T);
  buf.delta.resize((size_t)B * N * T);
  buf.kp.resize((size_t)B * K * (S + KC) * Hp);
  const Tiled tk = tiled(d, H), tv = tiled(d, hv);
  const int kcw = tk.kcw, nvk = kcw / VW;
  buf.kt.resize((size_t)B * K * d.nkv * tk.tile());
  buf.vt.resize((size_t)B * K * d.nkv * tv.tile());
  buf.dq.assign((size_t)C * B * N * T * Hp, 0.f);
  const float c = scale * kLog2e;
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const float *od = out.typed_data(), *ld = lse.typed_data(), *gd = dout.typed_data(),
              *gl = dlse.typed_data();

  // Pack: per (b, n) the query side, per (b, kh) the key side.
  parallel_for(pool, (int64_t)B * N + (int64_t)B * K, [&](int64_t it) {
    if (it < (int64_t)B * N) {
      const int b = it / N, n = it % N;
      float* qp = buf.qp.data() + it * T * Hp;
      float* dop = buf.dop.data() + it * T * hp;
      for (int t = 0; t < T; ++t) {
        const int64_t row = ((int64_t)b * T + t) * N + n;
        for (int x = 0; x < Hp; ++x) qp[(int64_t)t * Hp + x] = x < H ? qd[row * H + x] * c : 0.f;
        float dot = 0.f;
        for (int e = 0; e < hp; ++e) {
          const float g = e < hv ? gd[row * hv + e] : 0.f;
          dop[(int64_t)t * hp + e] = g;
          if (e < hv) dot += g * od[row * hv + e];
        }
        const float l = ld[row];
        buf.lse2[it * T + t] = std::isfinite(l) ? l * kLog2e : 0.f;
        buf.delta[it * T + t] = dot - gl[row];
      }
    } else {
      const int64_t bk_ = it - (int64_t)B * N;
      const int b = bk_ / K, kh = bk_ % K;
      float* kp = buf.kp.data() + bk_ * (S + KC) * Hp;
      for (int s = 0; s < S + KC; ++s)
        for (int x = 0; x < Hp; ++x)
          kp[(int64_t)s * Hp + x] = (s < S && x < H) ? kd[(((int64_t)b * S + s) * K + kh) * H + x] : 0.f;
      pack_tiled(d, tk, kd, b, kh, buf.kt.data() + bk_ * d.nkv * tk.tile());
      pack_tiled(d, tv, vd, b, kh, buf.vt.data() + bk_ * d.nkv * tv.tile());
    }
  });

  // Main pass: items (class cl, b, kh); each owns dk/dv rows of its key blocks and dq buffer cl.
  parallel_for(pool, (int64_t)C * B * K, [&](int64_t w) {
    const int cl = w / ((int64_t)B * K);
    const int b = (w / K) % B, kh = w % K;
    const int bl = d.Bl == 1 ? 0 : b;
    const float* kt = buf.kt.data() + ((int64_t)b * K + kh) * d.nkv * tk.tile();
    const float* vt = buf.vt.data() + ((int64_t)b * K + kh) * d.nkv * tv.tile();
    const float* kp = buf.kp.data() + ((int64_t)b * K + kh) * (S + KC) * Hp;
    std::vector<float> sb((size_t)RQ * KC), pb((size_t)RQ * KC), dkacc((size_t)KC * Hp),
        dvacc((size_t)KC * hp);
    for (int j = cl; j < d.nkv; j += C) {
      const std::vector<Visit>& vis = visits[(size_t)bl * d.nkv + j];
      const int j0 = j * d.bk, len = std::min(d.bk, S - j0);
      for (int c = 0; c < tk.nch && c * kcw < len; ++c) {
        const int c0 = c * kcw, nk = std::min(kcw, len - c0);
        const float* ktc = kt + j * tk.tile() + c * tk.block();
        const float* vtc = vt + j * tv.tile() + c * tv.block();
        std::fill(dkacc.begin(), dkacc.end(), 0.f);
        std::fill(dvacc.begin(), dvacc.end(), 0.f);
        for (const Visit& vi_ : vis) {
          const int i = vi_.i, row0 = i * d.bq, nrows = std::min(d.bq, T - row0);
          for (int g = 0; g < G; ++g) {
            const int n = kh * G + g;
            const int64_t bn = (int64_t)b * N + n;
            const bool* tmask = vi_.t >= 0 ? tile_mask(d, L, b, n, i, vi_.t) : nullptr;
            const float* qb = buf.qp.data() + (bn * T + row0) * Hp;
            const float* dob = buf.dop.data() + (bn * T + row0) * hp;
            const float* lse2 = buf.lse2.data() + bn * T + row0;
            const float* delta = buf.delta.data() + bn * T + row0;
            float* dqb = buf.dq.data() + (((int64_t)cl * B * N + bn) * T + row0) * Hp;
            for (int r0 = 0; r0 < nrows; r0 += RQ) {
              const int nr = std::min(RQ, nrows - r0);
              gemm<false>(nr, kcw, H, qb + (int64_t)r0 * Hp, Hp, 1, ktc, kcw, sb.data(), kcw);
              gemm<false>(nr, kcw, hv, dob + (int64_t)r0 * hp, hp, 1, vtc, kcw, pb.data(), kcw);
              // sb <- P, pb <- dS (gradient of the scores in natural units)
              const bool masked = tmask != nullptr || nk < kcw;
              for (int r = 0; r < nr; ++r) {
                float* srow = sb.data() + (size_t)r * kcw;
                float* dp = pb.data() + (size_t)r * kcw;
                const bool* mrow = tmask ? tmask + (int64_t)(r0 + r) * d.bk + c0 : nullptr;
                const vf l2 = splat(lse2[r0 + r]), dl = splat(delta[r0 + r]);
                for (int u = 0; u < nvk; ++u) {
                  vf p = exp2v(load(srow + u * VW) - l2);
                  if (masked) p = visible_lanes(mrow, u * VW, nk) ? p : splat(0.f);
                  store(srow + u * VW, p);
                  store(dp + u * VW, p * (load(dp + u * VW) - dl));
                }
              }
              gemm<true>(nk, hp, nr, sb.data(), 1, kcw, dob + (int64_t)r0 * hp, hp, dvacc.data(), hp);
              gemm<true>(nk, Hp, nr, pb.data(), 1, kcw, qb + (int64_t)r0 * Hp, Hp, dkacc.data(), Hp);
              gemm<true>(nr, Hp, nk, pb.data(), kcw, 1, kp + (int64_t)(j0 + c0) * Hp, Hp,
                         dqb + (int64_t)r0 * Hp, Hp);
            }
          }
        }
        for (int cc = 0; cc < nk; ++cc) {
          const int64_t row = ((int64_t)b * S + j0 + c0 + cc) * K + kh;
          for (int x = 0; x < H; ++x) dko[row * H + x] = dkacc[(size_t)cc * Hp + x] * kLn2;
          for (int e = 0; e < hv; ++e) dvo[row * hv + e] = dvacc[(size_t)cc * hp + e];
        }
      }
    }
  });

  // dq = scale · Σ_cl dq_cl, in class order.
  parallel_for(pool, (int64_t)B * N, [&](int64_t bn) {
    const int b = bn / N, n = bn % N;
    for (int t = 0; t < T; ++t) {
      float* dst = dqo + (((int64_t)b * T + t) * N + n) * H;
      for (int x = 0; x < H; ++x) {
        float acc = 0.f;
        for (int cl = 0; cl < C; ++cl)
          acc += buf.dq[(((int64_t)cl * B * N + bn) * T + t) * Hp + x];
        dst[x] = acc * scale;
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(attnjax_flash_fwd, FlashFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pnum
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pidx
                                  .Arg<ffi::Buffer<ffi::S32>>()   // fnum
                                  .Arg<ffi::Buffer<ffi::S32>>()   // fidx
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_kv")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()); // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(attnjax_flash_bwd, FlashBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dlse
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pnum
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pidx
                                  .Arg<ffi::Buffer<ffi::S32>>()   // fnum
                                  .Arg<ffi::Buffer<ffi::S32>>()   // fidx
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_kv")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dv

// The vector width this library was built for (a build/debug aid).
extern "C" int attnjax_flash_vector_width() { return VW; }
