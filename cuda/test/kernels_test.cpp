// kernels_test.cpp - CPU check of every kernel in cuda/*.cu; built and run by
// scripts/check-kernels-cpu.sh (see emu.h for how the kernels run on the CPU).
//
// Each test launches one kernel family through the emulator on shapes drawn from a fixed seed and
// compares the result with a straightforward reference written here (double precision where the
// kernel does float math; no code shared with the kernels):
//   - float outputs: |got - ref| <= tol * (1 + |ref|), tol by dtype (kTol / kAttnTol below; one
//     rounding to bf16 is <= 2^-8 relative, to f16 <= 2^-11). Copies, integer results, the
//     all-reduce (f32 sum in rank order, one rounding) and the fused residual must be bitwise equal.
//   - outputs are filled with NaN (integer outputs with a marker) before the launch, so an element
//     the kernel does not write fails. Inputs a kernel must not read hold NaN / inf / garbage: cache
//     slots past a sequence's length, unreferenced cache blocks, the other parts of a fused QKV
//     row, logits past `vocab`, block-table entries past a sequence's blocks.
//   - every buffer lies between PROT_NONE pages with canary bytes around it: a read out of bounds
//     crashes (reported as that test's failure), a write out of bounds fails the test.
//   - the emulator shuffles block and thread order and poisons shared memory per block.
// Output: one line per test, "PASS <name>  <detail>" or "FAIL <name>  <reason>", a summary per
// family, then the last line "N passed, M failed". Exit status 1 if any test failed.
// Every test runs in its own forked process, -j N at a time, so a crash or a UBSan abort fails
// only that test.
//
// Usage: kernels_test [-j N] [--filter S]... [--list] [-v] [--seed N] [--timeout SECONDS] [--no-fork]
#include "emu.h"
#include "params.h"
#include "selftest_kernels.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

// ---- kernel entry points (defined in cuda/*.cu) --------------------------------------------------
#define DECL_DT(NAME, P)                                                                           \
    extern "C" void NAME##_bf16(P);                                                                \
    extern "C" void NAME##_f16(P);                                                                 \
    extern "C" void NAME##_f32(P);
#define DECL_HD(NAME, P, DT)                                                                       \
    extern "C" void NAME##_##DT##_hd64(P);                                                         \
    extern "C" void NAME##_##DT##_hd128(P);                                                        \
    extern "C" void NAME##_##DT##_hd256(P);
DECL_DT(embedding, PatEmbeddingParams)
DECL_DT(rmsnorm, PatRmsNormParams)
DECL_DT(fused_add_rmsnorm, PatRmsNormParams)
DECL_DT(qk_norm, PatQkNormParams)
DECL_DT(rope, PatRopeParams)
DECL_DT(silu_and_mul, PatSiluMulParams)
DECL_DT(kv_append, PatKvAppendParams)
DECL_DT(paged_attention_reduce, PatPagedAttentionParams)
DECL_DT(argmax, PatArgmaxParams)
DECL_DT(sample, PatSampleParams)
DECL_DT(all_reduce_sum, PatAllReduceParams)
DECL_HD(paged_attention, PatPagedAttentionParams, bf16)
DECL_HD(paged_attention, PatPagedAttentionParams, f16)
DECL_HD(paged_attention, PatPagedAttentionParams, f32)
DECL_HD(prefill_attention, PatPrefillAttentionParams, bf16)
DECL_HD(prefill_attention, PatPrefillAttentionParams, f16)
DECL_HD(prefill_attention, PatPrefillAttentionParams, f32)
extern "C" void strided_copy(PatStridedCopyParams);
extern "C" void kv_gather(PatKvGatherParams);
extern "C" void kv_scatter(PatKvGatherParams);
extern "C" void kv_copy(PatKvCopyParams);

namespace {

// ---- dtypes ------------------------------------------------------------------------------------
enum DType { BF16 = 0, F16 = 1, F32 = 2 };
const DType kDtypes[] = {BF16, F16, F32};
const char* dname(DType d) { return d == BF16 ? "bf16" : d == F16 ? "f16" : "f32"; }
size_t dsize(DType d) { return d == F32 ? 4 : 2; }
// Tolerances (abs + rel) for results rounded once to the dtype, and for attention.
const double kTol[] = {6e-3, 8e-4, 1e-5};
const double kAttnTol[] = {8e-3, 1.5e-3, 3e-5};

struct Kernels {
    void (*embedding)(PatEmbeddingParams);
    void (*rmsnorm)(PatRmsNormParams);
    void (*fused_add_rmsnorm)(PatRmsNormParams);
    void (*qk_norm)(PatQkNormParams);
    void (*rope)(PatRopeParams);
    void (*silu_and_mul)(PatSiluMulParams);
    void (*kv_append)(PatKvAppendParams);
    void (*paged[3])(PatPagedAttentionParams); // hd64, hd128, hd256
    void (*paged_reduce)(PatPagedAttentionParams);
    void (*prefill[3])(PatPrefillAttentionParams);
    void (*argmax)(PatArgmaxParams);
    void (*sample)(PatSampleParams);
    void (*all_reduce)(PatAllReduceParams);
};
#define KERNELS(DT)                                                                                \
    Kernels {                                                                                      \
        embedding_##DT, rmsnorm_##DT, fused_add_rmsnorm_##DT, qk_norm_##DT, rope_##DT, silu_and_mul_##DT, \
            kv_append_##DT, {paged_attention_##DT##_hd64, paged_attention_##DT##_hd128, paged_attention_##DT##_hd256}, \
            paged_attention_reduce_##DT,                                                           \
            {prefill_attention_##DT##_hd64, prefill_attention_##DT##_hd128, prefill_attention_##DT##_hd256}, \
            argmax_##DT, sample_##DT, all_reduce_sum_##DT                                          \
    }
const Kernels kKernels[3] = {KERNELS(bf16), KERNELS(f16), KERNELS(f32)};
const Kernels& K(DType d) { return kKernels[d]; }
int hd_variant(int hd) { return hd <= 64 ? 64 : hd <= 128 ? 128 : 256; }
int hd_index(int hd) { return hd <= 64 ? 0 : hd <= 128 ? 1 : 2; }

uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Reference conversions, written from the IEEE formats (round to nearest even), independent of
// cuda_bf16.h / cuda_fp16.h (the emu_selftest "dtype conversions" test compares the two).
uint16_t bf16_encode(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
float bf16_decode(uint16_t h) { return bits_f32((uint32_t)h << 16); }
uint16_t f16_encode(float f) {
    const uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);         // NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);        // >= 65520 rounds to inf
    if (ax < 0x38800000u) {                                          // below 2^-14: subnormal
        const float scaled = bits_f32(ax) * 16777216.0f;             // exact: in units of 2^-24
        return (uint16_t)(sign | (uint32_t)std::nearbyint(scaled)); // 1024 becomes the min normal
    }
    const uint32_t r = (ax + 0xfffu + ((ax >> 13) & 1u)) >> 13; // round the 13 dropped bits
    return (uint16_t)(sign | (r - (112u << 10)));
}
float f16_decode(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return bits_f32(sign) + (sign ? -1.0f : 1.0f) * (float)m * 5.9604644775390625e-8f;
    if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
float round_to(DType d, float x) {
    return d == F32 ? x : d == BF16 ? bf16_decode(bf16_encode(x)) : f16_decode(f16_encode(x));
}

// ---- formatting, random numbers ----------------------------------------------------------------
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}
std::string join(const std::vector<int>& v) {
    std::string s;
    for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
    return "[" + s + "]";
}
uint64_t hash_str(const std::string& s) { // FNV-1a
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

struct Rng {
    std::mt19937_64 g;
    explicit Rng(uint64_t seed) : g(seed) {}
    int range(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); } // inclusive
    double uniform(double lo = 0.0, double hi = 1.0) { return std::uniform_real_distribution<double>(lo, hi)(g); }
    double normal() { return std::normal_distribution<double>(0.0, 1.0)(g); }
    bool chance(double p) { return uniform() < p; }
    template <class T> const T& pick(const std::vector<T>& v) { return v[(size_t)range(0, (int)v.size() - 1)]; }
};

// ---- device memory: guard pages and canaries ---------------------------------------------------
class Mem;
std::vector<const Mem*>& live_mems() {
    static std::vector<const Mem*> v;
    return v;
}

// One buffer in its own mapping: [PROT_NONE page][canary | data | canary][PROT_NONE page]. The data
// ends within 16 bytes of the upper guard page, so reads past the end fault; `misalign` shifts the
// data start off 16-byte alignment (to exercise scalar paths).
class Mem {
public:
    Mem(std::string name, size_t bytes, size_t misalign) : name_(std::move(name)), bytes_(bytes) {
        page_ = (size_t)sysconf(_SC_PAGESIZE);
        const size_t inner = (bytes + misalign + 16 + 64 + page_ - 1) / page_ * page_;
        total_ = inner + 2 * page_;
        void* m = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) throw std::runtime_error("mmap failed for " + name_);
        base_ = static_cast<unsigned char*>(m);
        mprotect(base_, page_, PROT_NONE);
        mprotect(base_ + page_ + inner, page_, PROT_NONE);
        lo_ = base_ + page_;
        hi_ = lo_ + inner;
        uintptr_t d = (reinterpret_cast<uintptr_t>(hi_) - bytes - misalign) & ~uintptr_t(15);
        data_ = reinterpret_cast<unsigned char*>(d + misalign);
        for (unsigned char* p = lo_; p < hi_; ++p) *p = canary(p);
        live_mems().push_back(this);
    }
    ~Mem() {
        auto& v = live_mems();
        v.erase(std::remove(v.begin(), v.end(), this), v.end());
        munmap(base_, total_);
    }
    Mem(const Mem&) = delete;
    Mem& operator=(const Mem&) = delete;
    unsigned char* data() const { return data_; }
    size_t bytes() const { return bytes_; }
    // "" if the canaries around the data are intact.
    std::string check_guards() const {
        for (const unsigned char* p = lo_; p < data_; ++p)
            if (*p != canary(p)) return fmt("%s: byte %td before its start was written", name_.c_str(), data_ - p);
        for (const unsigned char* p = data_ + bytes_; p < hi_; ++p)
            if (*p != canary(p)) return fmt("%s: byte %td past its end was written", name_.c_str(), p - (data_ + bytes_));
        return "";
    }

private:
    unsigned char canary(const unsigned char* p) const { return (unsigned char)(0xa5u ^ ((p - lo_) * 131u)); }
    std::string name_;
    size_t bytes_, page_, total_;
    unsigned char *base_, *lo_, *hi_, *data_;
};

// Typed buffer (host view of "device" memory).
template <class S> class Buf {
public:
    Buf(const std::string& name, size_t n, S init = S{}, size_t misalign_bytes = 0)
        : mem_(std::make_unique<Mem>(name, n * sizeof(S), misalign_bytes)), n_(n) {
        for (size_t i = 0; i < n; ++i) std::memcpy(mem_->data() + i * sizeof(S), &init, sizeof(S));
    }
    S* data() const { return reinterpret_cast<S*>(mem_->data()); }
    S& operator[](size_t i) { return data()[i]; }
    const S& operator[](size_t i) const { return data()[i]; }
    size_t size() const { return n_; }
    PatDevPtr dev(size_t off = 0) const { return (PatDevPtr)(uintptr_t)(data() + off); }
    std::vector<S> copy() const { return std::vector<S>(data(), data() + n_); }

private:
    std::unique_ptr<Mem> mem_;
    size_t n_;
};

// Elements of a runtime dtype; set() rounds to nearest even.
class Tensor {
public:
    Tensor(const std::string& name, DType dt, size_t n, size_t misalign_elems = 0)
        : dt_(dt), n_(n), mem_(std::make_unique<Mem>(name, n * dsize(dt), misalign_elems * dsize(dt))) {}
    DType dt() const { return dt_; }
    size_t size() const { return n_; }
    float get(size_t i) const {
        const unsigned char* p = mem_->data() + i * dsize(dt_);
        if (dt_ == F32) { float f; std::memcpy(&f, p, 4); return f; }
        uint16_t h;
        std::memcpy(&h, p, 2);
        return dt_ == BF16 ? bf16_decode(h) : f16_decode(h);
    }
    void set(size_t i, float v) {
        unsigned char* p = mem_->data() + i * dsize(dt_);
        if (dt_ == F32) { std::memcpy(p, &v, 4); return; }
        const uint16_t h = dt_ == BF16 ? bf16_encode(v) : f16_encode(v);
        std::memcpy(p, &h, 2);
    }
    void fill(float v) { for (size_t i = 0; i < n_; ++i) set(i, v); }
    void fill_nan() { fill(NAN); }
    void fill_normal(Rng& r, double scale = 1.0, double mean = 0.0) {
        for (size_t i = 0; i < n_; ++i) set(i, (float)(mean + scale * r.normal()));
    }
    std::vector<float> values() const {
        std::vector<float> v(n_);
        for (size_t i = 0; i < n_; ++i) v[i] = get(i);
        return v;
    }
    std::vector<unsigned char> bytes() const { return {mem_->data(), mem_->data() + n_ * dsize(dt_)}; }
    const unsigned char* raw() const { return mem_->data(); }
    PatDevPtr dev(size_t elem_off = 0) const { return (PatDevPtr)(uintptr_t)(mem_->data() + elem_off * dsize(dt_)); }

private:
    DType dt_;
    size_t n_;
    std::unique_ptr<Mem> mem_;
};

// ---- test context and checks --------------------------------------------------------------------
struct TestAbort : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct Ctx {
    Rng rng{1};
    std::vector<std::string> failures;
    std::string info;     // extra detail for the PASS line
    double worst = 0.0;   // largest error / tolerance over the float comparisons
    int checks = 0;
};
Ctx* g_ctx = nullptr;

void fail(const std::string& msg) { g_ctx->failures.push_back(msg); }

template <class P> void launch(const char* what, void (*kernel)(P), dim3 grid, dim3 block, const P& p) {
    try {
        emu::launch(kernel, grid, block, p);
    } catch (const emu::Error& e) {
        throw TestAbort(std::string(what) + ": " + e.what());
    }
    for (const Mem* m : live_mems()) {
        const std::string g = m->check_guards();
        if (!g.empty()) throw TestAbort(std::string(what) + ": out-of-bounds write: " + g);
    }
}

using Where = std::function<std::string(size_t)>;
std::string at(const Where& where, size_t i) { return where ? where(i) : fmt("[%zu]", i); }

// Element-wise |got - ref| <= tol * (1 + |ref|); a NaN or inf result never passes (unless the
// reference is the same non-finite value).
void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref, double tol,
                  const Where& where = nullptr) {
    ++g_ctx->checks;
    if (got.size() != ref.size()) return fail(fmt("%s: size %zu, want %zu", what.c_str(), got.size(), ref.size()));
    size_t bad = 0, first = 0, wi = 0;
    double worst = 0.0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double g = got[i], r = ref[i];
        double ratio;
        if (!std::isfinite(r)) ratio = (g == r || (std::isnan(g) && std::isnan(r))) ? 0.0 : INFINITY;
        else ratio = std::isfinite(g) ? std::fabs(g - r) / (tol * (1.0 + std::fabs(r))) : INFINITY;
        if (!(ratio <= 1.0)) {
            if (bad++ == 0) first = i;
        }
        if (!(ratio <= worst)) { worst = ratio; wi = i; }
    }
    g_ctx->worst = std::max(g_ctx->worst, worst);
    if (bad)
        fail(fmt("%s: %zu of %zu elements off (tol %.1e); first %s got %.8g want %.8g; worst %s got %.8g want %.8g",
                 what.c_str(), bad, got.size(), tol, at(where, first).c_str(), got[first], ref[first],
                 at(where, wi).c_str(), got[wi], ref[wi]));
}

// Bitwise equality of n elements of elem_bytes each.
void expect_bits(const std::string& what, const void* got, const void* want, size_t n, size_t elem_bytes,
                 const Where& where = nullptr) {
    ++g_ctx->checks;
    const unsigned char *g = static_cast<const unsigned char*>(got), *w = static_cast<const unsigned char*>(want);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; ++i)
        if (std::memcmp(g + i * elem_bytes, w + i * elem_bytes, elem_bytes) != 0 && bad++ == 0) first = i;
    if (!bad) return;
    auto hex = [&](const unsigned char* p) {
        std::string s;
        for (size_t b = elem_bytes; b-- > 0;) s += fmt("%02x", p[first * elem_bytes + b]);
        return s;
    };
    fail(fmt("%s: %zu of %zu elements differ; first %s got 0x%s want 0x%s", what.c_str(), bad, n,
             at(where, first).c_str(), hex(g).c_str(), hex(w).c_str()));
}

void expect_tensor_bits(const std::string& what, const Tensor& got, const std::vector<float>& want_values,
                        const Where& where = nullptr) {
    Tensor want("expected", got.dt(), want_values.size());
    for (size_t i = 0; i < want_values.size(); ++i) want.set(i, want_values[i]);
    expect_bits(what, got.raw(), want.raw(), got.size(), dsize(got.dt()), where);
}

// ---- registry ----------------------------------------------------------------------------------
struct TestCase {
    std::string family, name;
    std::function<void()> run;
};
std::vector<TestCase>& registry() {
    static std::vector<TestCase> v;
    return v;
}
void add(const std::string& family, const std::string& name, std::function<void()> fn) {
    registry().push_back({family, family + " " + name, std::move(fn)});
}

// =================================================================================================
// emulator self-tests
// =================================================================================================
void register_selftests() {
    add("emu_selftest", "dtype conversions: reference vs cuda_bf16.h/cuda_fp16.h", [] {
        std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, 1e-8f, -6.1e-5f, 5.96e-8f,
                                 2.98e-8f, 2.99e-8f, 3.0e38f, 3.4028235e38f, INFINITY, -INFINITY, 1.00390625f,
                                 1.01171875f, 6.103515625e-05f, 1e-40f};
        Rng& r = g_ctx->rng;
        for (int i = 0; i < 200000; ++i) xs.push_back(bits_f32((uint32_t)r.g()));
        size_t bad_bf = 0, bad_h = 0, bad_dec = 0;
        std::string ex;
        for (float x : xs) {
            const __nv_bfloat16 b = __float2bfloat16_rn(x);
            const __half h = __float2half_rn(x);
            uint16_t bb, hb;
            std::memcpy(&bb, &b, 2);
            std::memcpy(&hb, &h, 2);
            const bool bnan = std::isnan(x);
            if (bnan ? !std::isnan(bf16_decode(bb)) : bb != bf16_encode(x)) {
                if (!bad_bf++) ex = fmt("bf16(%a): header 0x%04x, reference 0x%04x", x, bb, bf16_encode(x));
            }
            if (bnan ? !std::isnan(f16_decode(hb)) : hb != f16_encode(x)) {
                if (!bad_h++) ex = fmt("f16(%a): header 0x%04x, reference 0x%04x", x, hb, f16_encode(x));
            }
            const float db = __bfloat162float(b), dh = __half2float(h);
            if (!bnan && (f32_bits(db) != f32_bits(bf16_decode(bb)) || f32_bits(dh) != f32_bits(f16_decode(hb))))
                if (!bad_dec++) ex = fmt("decode(%a) differs", x);
        }
        if (bad_bf || bad_h || bad_dec)
            fail(fmt("%zu bf16, %zu f16 encodings and %zu decodings differ, e.g. %s", bad_bf, bad_h, bad_dec, ex.c_str()));
        g_ctx->info = fmt("%zu values", xs.size());
    });

    add("emu_selftest", "intrinsics: __expf, __float2ull_rz, rsqrtf", [] {
        double worst = 0;
        for (float x = -80.0f; x < 80.0f; x += 0.173f)
            worst = std::max(worst, std::fabs((double)__expf(x) / std::exp((double)x) - 1.0));
        if (worst > 2e-5) fail(fmt("__expf relative error %.3g", worst));
        const struct { float in; unsigned long long want; } cases[] = {
            {-1.0f, 0}, {0.0f, 0}, {0.999f, 0}, {1.5f, 1}, {4294967296.0f, 4294967296ull},
            {1e30f, ~0ull}, {NAN, 0}, {INFINITY, ~0ull}, {-INFINITY, 0}};
        for (auto c : cases)
            if (__float2ull_rz(c.in) != c.want) fail(fmt("__float2ull_rz(%g) = %llu", c.in, __float2ull_rz(c.in)));
        if (std::fabs(rsqrtf(4.0f) - 0.5f) > 1e-7f) fail("rsqrtf(4) != 0.5");
        g_ctx->info = fmt("__expf max rel err %.2g", worst);
    });

    add("emu_selftest", "warp shuffles, ballot, any, all, syncwarp", [] {
        const int n = 96;
        Buf<uint32_t> out("out", (size_t)n * 16, 0xdeadbeefu);
        EmuSelftestParams p{out.dev(), 0, n, 0};
        launch("warp_ops", emu_selftest_warp_ops, dim3(1), dim3(n), p);
        std::vector<uint32_t> want((size_t)n * 16);
        auto v = [](unsigned t) { return t * 3 + 1; };
        for (unsigned t = 0; t < (unsigned)n; ++t) {
            const unsigned lane = t & 31, w = t - lane;
            uint32_t* o = &want[t * 16];
            o[0] = v(w + (lane ^ 1));
            o[1] = v(w + (lane ^ 16));
            o[2] = lane >= 1 ? v(t - 1) : v(t);
            o[3] = lane >= 5 ? v(t - 5) : v(t);
            o[4] = lane + 3 < 32 ? v(t + 3) : v(t);
            o[5] = lane + 31 < 32 ? v(t + 31) : v(t);
            o[6] = v(w + 7);
            o[7] = v(w + ((lane + 5) & 31));
            uint32_t ballot = 0;
            for (unsigned l = 0; l < 32; l += 3) ballot |= 1u << l;
            o[8] = ballot;
            o[9] = 1;
            o[10] = 1;
            o[11] = 0;
            o[12] = v(w + (lane ^ 2));
            o[13] = 5;
            o[14] = f32_bits((float)(lane + 2 < 32 ? v(t + 2) : v(t)) * 0.5f);
            o[15] = (lane ^ 31) + 3200;
        }
        expect_bits("out", out.data(), want.data(), want.size(), 4,
                    [](size_t i) { return fmt("thread %zu op %zu", i / 16, i % 16); });
    });

    add("emu_selftest", "shared memory and __syncthreads, blocks 32/256/1024", [] {
        for (int n : {32, 256, 1024}) {
            const int grid = 3;
            Buf<uint32_t> out("out", (size_t)grid * n * 2, 0xdeadbeefu);
            EmuSelftestParams p{out.dev(), 0, n, 0};
            launch("shared_rounds", emu_selftest_shared_rounds, dim3(grid), dim3(n), p);
            std::vector<uint32_t> want(out.size());
            for (int b = 0; b < grid; ++b)
                for (int t = 0; t < n; ++t) {
                    want[(size_t)b * n * 2 + t] = ((t + 1) % n) * 7 + b;
                    want[(size_t)b * n * 2 + n + t] = ((n - t) % n) * 7 + b + 1;
                }
            expect_bits(fmt("out (block %d)", n), out.data(), want.data(), want.size(), 4);
        }
    });

    add("emu_selftest", "a missing __syncthreads is caught", [] {
        const int n = 256;
        Buf<uint32_t> out("out", n, 0xdeadbeefu);
        EmuSelftestParams p{out.dev(), 0, n, 0};
        launch("shared_racy", emu_selftest_shared_racy, dim3(1), dim3(n), p);
        int wrong = 0;
        for (int t = 0; t < n; ++t) wrong += out[t] != (uint32_t)(n - 1 - t) * 7;
        if (wrong == 0) fail("the racy kernel produced the race-free result: thread order is not shuffled");
        g_ctx->info = fmt("%d of %d threads read stale shared memory", wrong, n);
    });

    add("emu_selftest", "shared memory is poisoned before each block", [] {
        size_t bytes = 0;
        if (!emu::shared_poisoning(&bytes))
            throw TestAbort("no emu_shared section: the build did not move the kernels' .bss (see check-kernels-cpu.sh)");
        Buf<uint32_t> out("out", 2, 0u);
        EmuSelftestParams p{out.dev(), 0, 0, 0};
        launch("shared_unwritten", emu_selftest_shared_unwritten, dim3(2), dim3(64), p);
        if (out[0] != 0xffffffffu) fail(fmt("unwritten shared float reads 0x%08x, want 0xffffffff", out[0]));
        if (out[1] != 63) fail(fmt("written shared value reads %u, want 63", out[1]));
        g_ctx->info = fmt("%zu bytes of __shared__ variables", bytes);
    });

    add("emu_selftest", "3-D grid/block indices, shuffled block order", [] {
        const dim3 grid(3, 2, 2), block(8, 4, 2);
        const unsigned nth = 64, nbl = 12, total = nth * nbl;
        Buf<uint32_t> out("out", total + nbl, 0xdeadbeefu);
        Buf<uint32_t> counter("counter", 1, 0u);
        EmuSelftestParams p{out.dev(), counter.dev(), 0, 0};
        launch("indices", emu_selftest_indices, grid, block, p);
        std::vector<uint32_t> want(total);
        for (unsigned bz = 0; bz < 2; ++bz)
            for (unsigned by = 0; by < 2; ++by)
                for (unsigned bx = 0; bx < 3; ++bx)
                    for (unsigned tz = 0; tz < 2; ++tz)
                        for (unsigned ty = 0; ty < 4; ++ty)
                            for (unsigned tx = 0; tx < 8; ++tx) {
                                const unsigned bl = bx + 3 * (by + 2 * bz), th = tx + 8 * (ty + 4 * tz);
                                want[bl * nth + th] = (bx << 24) | (by << 20) | (bz << 16) | (tx << 8) | (ty << 4) | tz;
                            }
        expect_bits("indices", out.data(), want.data(), total, 4);
        std::vector<uint32_t> order(out.data() + total, out.data() + total + nbl), sorted = order;
        std::sort(sorted.begin(), sorted.end());
        bool perm = true, identity = true;
        for (unsigned i = 0; i < nbl; ++i) {
            perm = perm && sorted[i] == i;
            identity = identity && order[i] == i;
        }
        if (!perm) fail("block execution order is not a permutation of the grid");
        if (identity) fail("blocks ran in grid order: block order is not shuffled");
    });

    add("emu_selftest", "atomics", [] {
        const unsigned grid = 5, block = 128, n = grid * block;
        Buf<uint32_t> out("out", 8, 0u);
        Buf<unsigned long long> sum("sum", 1, 0ull);
        EmuSelftestParams p{out.dev(), sum.dev(), 0, 0};
        launch("atomics", emu_selftest_atomics, dim3(grid), dim3(block), p);
        std::vector<uint32_t> want(8, 0);
        for (unsigned g = 0; g < n; ++g) ++want[g % 7];
        want[7] = n - 1;
        expect_bits("histogram and max", out.data(), want.data(), 8, 4);
        if (sum[0] != (unsigned long long)n * (n - 1) / 2) fail(fmt("64-bit sum %llu", sum[0]));
    });

    add("emu_selftest", "misuse is rejected (divergent barriers / warp ops, partial masks)", [] {
        const char* what[] = {"__syncthreads in a divergent branch", "different warp ops in one warp",
                              "__syncthreads after some threads exited", "partial shuffle mask",
                              "lane exits while its warp shuffles"};
        std::string seen;
        for (int mode = 0; mode < 5; ++mode) {
            Buf<uint32_t> out("out", 64, 0u);
            EmuSelftestParams p{out.dev(), 0, 64, mode};
            try {
                emu::launch(emu_selftest_misuse, dim3(1), dim3(64), p);
                fail(fmt("%s: not detected", what[mode]));
            } catch (const emu::Error& e) {
                if (mode == 0) seen = e.what();
            }
        }
        g_ctx->info = "e.g. " + seen.substr(0, 90);
    });
}

// =================================================================================================
// embedding
// =================================================================================================
void test_embedding(DType dt, int n_tokens, int hidden, int block, bool misalign) {
    Rng& r = g_ctx->rng;
    const int vocab_start = r.range(0, 1000), vocab_local = r.range(1, 300);
    Tensor table("table", dt, (size_t)vocab_local * hidden, misalign ? 1 : 0);
    table.fill_normal(r);
    const std::vector<int64_t> edge = {vocab_start - 1, vocab_start, vocab_start + vocab_local - 1,
                                       vocab_start + vocab_local, 0, 0xffffffffll};
    Buf<uint32_t> ids("ids", n_tokens);
    for (int t = 0; t < n_tokens; ++t) {
        int64_t id = t < (int)edge.size() ? edge[t] : r.chance(0.6) ? vocab_start + r.range(0, vocab_local - 1) : r.range(0, 2000);
        ids[t] = (uint32_t)std::max<int64_t>(id, 0);
    }
    Tensor out("out", dt, (size_t)n_tokens * hidden);
    out.fill_nan();
    PatEmbeddingParams p{out.dev(), ids.dev(), table.dev(), n_tokens, hidden, vocab_start, vocab_local};
    launch("embedding", K(dt).embedding, dim3(n_tokens), dim3(block), p);
    std::vector<float> want((size_t)n_tokens * hidden);
    int hits = 0;
    for (int t = 0; t < n_tokens; ++t) {
        const int64_t local = (int64_t)ids[t] - vocab_start;
        const bool hit = local >= 0 && local < vocab_local;
        hits += hit;
        for (int d = 0; d < hidden; ++d) want[(size_t)t * hidden + d] = hit ? table.get((size_t)local * hidden + d) : 0.0f;
    }
    expect_tensor_bits("out", out, want, [hidden](size_t i) { return fmt("token %zu dim %zu", i / hidden, i % hidden); });
    g_ctx->info = fmt("%d of %d ids in the shard", hits, n_tokens);
}

void register_embedding() {
    struct C { int n, hidden, block; bool mis; };
    const C cases[] = {{9, 4096, 256, false}, {7, 1001, 256, false}, {6, 512, 64, true}, {12, 136, 32, false}};
    for (DType dt : kDtypes)
        for (const C& c : cases)
            add("embedding", fmt("%s tokens=%d hidden=%d block=%d%s", dname(dt), c.n, c.hidden, c.block,
                                 c.mis ? " misaligned-table" : ""),
                [=] { test_embedding(dt, c.n, c.hidden, c.block, c.mis); });
}

// =================================================================================================
// rmsnorm, fused_add_rmsnorm
// =================================================================================================
void test_rmsnorm(DType dt, bool fused, int rows, int dim, int block, bool alias, bool misalign) {
    Rng& r = g_ctx->rng;
    const float eps = 1e-6f;
    Tensor x("x", dt, (size_t)rows * dim, misalign ? 1 : 0), w("weight", dt, dim);
    for (int row = 0; row < rows; ++row) {
        const double scale = row == 1 ? 1e-3 : row == 2 ? 30.0 : 1.0; // tiny and large rows
        for (int d = 0; d < dim; ++d) x.set((size_t)row * dim + d, (float)(scale * r.normal()));
    }
    w.fill_normal(r, 0.3, 1.0);
    std::unique_ptr<Tensor> res, out;
    if (fused) {
        res = std::make_unique<Tensor>("residual", dt, (size_t)rows * dim, misalign ? 1 : 0);
        res->fill_normal(r);
    }
    if (!alias) {
        out = std::make_unique<Tensor>("out", dt, (size_t)rows * dim);
        out->fill_nan();
    }
    const std::vector<float> x0 = x.values(), res0 = fused ? res->values() : std::vector<float>();
    const Tensor& o = alias ? x : *out;
    PatRmsNormParams p{o.dev(), x.dev(), fused ? res->dev() : 0, w.dev(), rows, dim, eps, 0};
    launch(fused ? "fused_add_rmsnorm" : "rmsnorm", fused ? K(dt).fused_add_rmsnorm : K(dt).rmsnorm, dim3(rows),
           dim3(block), p);
    std::vector<double> ref((size_t)rows * dim);
    std::vector<float> want_res((size_t)rows * dim);
    for (int row = 0; row < rows; ++row) {
        double ss = 0.0;
        for (int d = 0; d < dim; ++d) {
            const size_t i = (size_t)row * dim + d;
            const float a = fused ? round_to(dt, x0[i] + res0[i]) : x0[i]; // the sum is rounded to T
            want_res[i] = a;
            ss += (double)a * a;
        }
        const double inv = 1.0 / std::sqrt(ss / dim + eps);
        for (int d = 0; d < dim; ++d) {
            const size_t i = (size_t)row * dim + d;
            ref[i] = want_res[i] * inv * w.get(d);
        }
    }
    const Where where = [dim](size_t i) { return fmt("row %zu dim %zu", i / dim, i % dim); };
    expect_close("out", o.values(), ref, kTol[dt], where);
    if (fused) expect_tensor_bits("residual", *res, want_res, where);
}

void register_rmsnorm() {
    struct C { int rows, dim, block; bool alias, mis; };
    const C cases[] = {{3, 4096, 256, false, false}, {7, 1001, 1024, true, false}, {4, 64, 32, false, false},
                       {5, 2048, 128, true, true}};
    for (bool fused : {false, true})
        for (DType dt : kDtypes)
            for (const C& c : cases)
                add(fused ? "fused_add_rmsnorm" : "rmsnorm",
                    fmt("%s rows=%d dim=%d block=%d%s%s", dname(dt), c.rows, c.dim, c.block, c.alias ? " out=x" : "",
                        c.mis ? " misaligned" : ""),
                    [=] { test_rmsnorm(dt, fused, c.rows, c.dim, c.block, c.alias, c.mis); });
}

// =================================================================================================
// qk_norm and rope: in place on q/k heads inside a fused QKV buffer
// =================================================================================================
struct QkvView {
    int n_tokens, hq, hkv, hd, stride;
    // element of token t, head h (q heads first, then k heads) dim d; v heads and padding follow
    size_t index(int t, int h, int d) const { return (size_t)t * stride + (size_t)h * hd + d; }
    bool is_qk(size_t i) const { return (int)(i % stride) < (hq + hkv) * hd; }
};

void test_qk_norm(DType dt, int n_tokens, int hq, int hkv, int hd, int pad) {
    Rng& r = g_ctx->rng;
    const float eps = 1e-6f;
    QkvView v{n_tokens, hq, hkv, hd, (hq + 2 * hkv) * hd + pad};
    Tensor qkv("qkv", dt, (size_t)n_tokens * v.stride), qw("q_weight", dt, hd), kw("k_weight", dt, hd);
    qkv.fill_normal(r, 2.0);
    qw.fill_normal(r, 0.3, 1.0);
    kw.fill_normal(r, 0.3, 1.0);
    const std::vector<float> x0 = qkv.values();
    PatQkNormParams p{qkv.dev(), qkv.dev((size_t)hq * hd), qw.dev(), kw.dev(), n_tokens, hq, hkv, hd,
                      v.stride, v.stride, eps, 0};
    const int rows = n_tokens * (hq + hkv);
    launch("qk_norm", K(dt).qk_norm, dim3((rows + 7) / 8), dim3(256), p);
    std::vector<double> ref(x0.begin(), x0.end());
    for (int t = 0; t < n_tokens; ++t)
        for (int h = 0; h < hq + hkv; ++h) {
            double ss = 0.0;
            for (int d = 0; d < hd; ++d) ss += (double)x0[v.index(t, h, d)] * x0[v.index(t, h, d)];
            const double inv = 1.0 / std::sqrt(ss / hd + eps);
            for (int d = 0; d < hd; ++d)
                ref[v.index(t, h, d)] = x0[v.index(t, h, d)] * inv * (h < hq ? qw.get(d) : kw.get(d));
        }
    const std::vector<float> got = qkv.values();
    std::vector<float> got_qk, got_rest, rest0;
    std::vector<double> ref_qk;
    for (size_t i = 0; i < got.size(); ++i) {
        if (v.is_qk(i)) { got_qk.push_back(got[i]); ref_qk.push_back(ref[i]); }
        else { got_rest.push_back(got[i]); rest0.push_back(x0[i]); }
    }
    expect_close("q/k heads", got_qk, ref_qk, kTol[dt]);
    expect_bits("v heads and padding (must be untouched)", got_rest.data(), rest0.data(), got_rest.size(), 4);
}

// HF RoPE inverse frequencies: default, or llama3 scaling (factor 8, low/high freq factor 1/4,
// original context 8192), computed on the host as the Rust side does.
std::vector<float> rope_inv_freq(int hd, double theta, bool llama3) {
    std::vector<float> inv(hd / 2);
    for (int i = 0; i < hd / 2; ++i) {
        double f = 1.0 / std::pow(theta, 2.0 * i / hd);
        if (llama3) {
            const double factor = 8.0, lo = 1.0, hi = 4.0, orig = 8192.0, wl = 2 * M_PI / f;
            if (wl > orig / lo) f /= factor;
            else if (wl >= orig / hi) {
                const double s = (orig / wl - lo) / (hi - lo);
                f = (1 - s) * f / factor + s * f;
            }
        }
        inv[i] = (float)f;
    }
    return inv;
}

void test_rope(DType dt, int n_tokens, int hq, int hkv, int hd, int pad, int block, double theta, bool llama3) {
    Rng& r = g_ctx->rng;
    QkvView v{n_tokens, hq, hkv, hd, (hq + 2 * hkv) * hd + pad};
    Tensor qkv("qkv", dt, (size_t)n_tokens * v.stride);
    qkv.fill_normal(r, 2.0);
    const std::vector<float> x0 = qkv.values();
    const std::vector<int> special = {0, 1, 17, 8191, 32767, 131071};
    Buf<int32_t> pos("positions", n_tokens);
    for (int t = 0; t < n_tokens; ++t) pos[t] = t < (int)special.size() ? special[t] : r.range(0, 200000);
    const std::vector<float> inv = rope_inv_freq(hd, theta, llama3);
    Buf<float> inv_buf("inv_freq", inv.size());
    std::copy(inv.begin(), inv.end(), inv_buf.data());
    PatRopeParams p{qkv.dev(), qkv.dev((size_t)hq * hd), pos.dev(), inv_buf.dev(), n_tokens, hq, hkv, hd, v.stride, v.stride};
    launch("rope", K(dt).rope, dim3(n_tokens), dim3(block), p);
    std::vector<double> ref(x0.begin(), x0.end());
    const int half = hd / 2;
    for (int t = 0; t < n_tokens; ++t)
        for (int h = 0; h < hq + hkv; ++h)
            for (int i = 0; i < half; ++i) {
                const float a = (float)pos[t] * inv[i]; // the angle is an f32 product (kernel contract)
                const double c = std::cos((double)a), s = std::sin((double)a);
                const double x1 = x0[v.index(t, h, i)], x2 = x0[v.index(t, h, i + half)];
                ref[v.index(t, h, i)] = x1 * c - x2 * s;
                ref[v.index(t, h, i + half)] = x2 * c + x1 * s;
            }
    const std::vector<float> got = qkv.values();
    std::vector<float> got_qk, got_rest, rest0;
    std::vector<double> ref_qk;
    std::vector<size_t> idx;
    for (size_t i = 0; i < got.size(); ++i) {
        if (v.is_qk(i)) { got_qk.push_back(got[i]); ref_qk.push_back(ref[i]); idx.push_back(i); }
        else { got_rest.push_back(got[i]); rest0.push_back(x0[i]); }
    }
    expect_close("q/k heads", got_qk, ref_qk, kTol[dt], [&](size_t k) {
        const size_t i = idx[k];
        return fmt("token %zu head %zu dim %zu", i / v.stride, i % v.stride / hd, i % v.stride % hd);
    });
    expect_bits("v heads and padding (must be untouched)", got_rest.data(), rest0.data(), got_rest.size(), 4);
}

void register_qk_norm_rope() {
    struct C { int n, hq, hkv, hd, pad; };
    const C qk[] = {{5, 4, 2, 128, 0}, {9, 6, 1, 64, 0}, {3, 2, 2, 256, 0}, {4, 5, 1, 80, 3}};
    for (DType dt : kDtypes)
        for (const C& c : qk)
            add("qk_norm", fmt("%s tokens=%d heads=%d+%d hd=%d pad=%d", dname(dt), c.n, c.hq, c.hkv, c.hd, c.pad),
                [=] { test_qk_norm(dt, c.n, c.hq, c.hkv, c.hd, c.pad); });
    struct R { int n, hq, hkv, hd, pad, block; double theta; bool llama3; };
    const R rp[] = {{7, 4, 2, 128, 0, 256, 10000.0, false}, {6, 8, 1, 64, 0, 64, 500000.0, true},
                    {3, 2, 1, 256, 0, 128, 1000000.0, false}, {5, 3, 3, 80, 2, 32, 10000.0, true}};
    for (DType dt : kDtypes)
        for (const R& c : rp)
            add("rope", fmt("%s tokens=%d heads=%d+%d hd=%d pad=%d block=%d theta=%g%s", dname(dt), c.n, c.hq, c.hkv,
                            c.hd, c.pad, c.block, c.theta, c.llama3 ? " llama3" : ""),
                [=] { test_rope(dt, c.n, c.hq, c.hkv, c.hd, c.pad, c.block, c.theta, c.llama3); });
}

// =================================================================================================
// silu_and_mul
// =================================================================================================
void test_silu(DType dt, int rows, int inter, int grid, int block, bool misalign) {
    Rng& r = g_ctx->rng;
    Tensor in("input", dt, (size_t)rows * 2 * inter, misalign ? 1 : 0), out("out", dt, (size_t)rows * inter);
    in.fill_normal(r, 4.0);
    const float special[] = {25.0f, -25.0f, 90.0f, -90.0f, 0.0f, -1e-3f};
    for (size_t k = 0; k < 6 && k < (size_t)inter; ++k) in.set(k, special[k]); // gate values of row 0
    out.fill_nan();
    PatSiluMulParams p{out.dev(), in.dev(), rows, inter};
    launch("silu_and_mul", K(dt).silu_and_mul, dim3(grid), dim3(block), p);
    std::vector<double> ref((size_t)rows * inter);
    for (int row = 0; row < rows; ++row)
        for (int i = 0; i < inter; ++i) {
            const double g = in.get((size_t)row * 2 * inter + i), u = in.get((size_t)row * 2 * inter + inter + i);
            ref[(size_t)row * inter + i] = g / (1.0 + std::exp(-g)) * u;
        }
    expect_close("out", out.values(), ref, kTol[dt], [inter](size_t i) { return fmt("row %zu col %zu", i / inter, i % inter); });
}

void register_silu() {
    struct C { int rows, inter, grid, block; bool mis; };
    const C cases[] = {{1, 8, 1, 256, false}, {5, 1792, 4, 256, false}, {3, 1793, 64, 128, false}, {4, 2048, 3, 1024, true}};
    for (DType dt : kDtypes)
        for (const C& c : cases)
            add("silu_and_mul", fmt("%s rows=%d inter=%d grid=%d block=%d%s", dname(dt), c.rows, c.inter, c.grid,
                                    c.block, c.mis ? " misaligned" : ""),
                [=] { test_silu(dt, c.rows, c.inter, c.grid, c.block, c.mis); });
}

// =================================================================================================
// kv_append
// =================================================================================================
void test_kv_append(DType dt, int n_tokens, int hq, int hkv, int hd, int bs, int num_blocks, int pad, int block) {
    Rng& r = g_ctx->rng;
    const int stride = (hq + 2 * hkv) * hd + pad;
    const size_t cache_elems = (size_t)num_blocks * hkv * bs * hd;
    Tensor qkv("qkv", dt, (size_t)n_tokens * stride), kc("k_cache", dt, cache_elems), vc("v_cache", dt, cache_elems);
    qkv.fill_normal(r);
    kc.fill_normal(r);
    vc.fill_normal(r);
    std::vector<int64_t> free_slots((size_t)num_blocks * bs);
    std::iota(free_slots.begin(), free_slots.end(), 0);
    std::shuffle(free_slots.begin(), free_slots.end(), r.g);
    Buf<int64_t> slots("slot_mapping", n_tokens);
    int skipped = 0;
    for (int t = 0; t < n_tokens; ++t) {
        const bool skip = t == 1 || r.chance(0.2);
        slots[t] = skip ? -1 : free_slots[t];
        skipped += skip;
    }
    std::vector<float> want_k = kc.values(), want_v = vc.values();
    const size_t k_off = (size_t)hq * hd, v_off = (size_t)(hq + hkv) * hd;
    for (int t = 0; t < n_tokens; ++t) {
        if (slots[t] < 0) continue;
        const int64_t b = slots[t] / bs, o = slots[t] % bs;
        for (int h = 0; h < hkv; ++h)
            for (int d = 0; d < hd; ++d) {
                const size_t dst = (((size_t)b * hkv + h) * bs + o) * hd + d;
                want_k[dst] = qkv.get((size_t)t * stride + k_off + (size_t)h * hd + d);
                want_v[dst] = qkv.get((size_t)t * stride + v_off + (size_t)h * hd + d);
            }
    }
    PatKvAppendParams p{kc.dev(), vc.dev(), qkv.dev(k_off), qkv.dev(v_off), slots.dev(), n_tokens, hkv, hd, bs, stride, stride};
    launch("kv_append", K(dt).kv_append, dim3(n_tokens), dim3(block), p);
    const Where where = [=](size_t i) {
        return fmt("block %zu head %zu offset %zu dim %zu", i / ((size_t)hkv * bs * hd), i / ((size_t)bs * hd) % hkv,
                   i / hd % bs, i % hd);
    };
    expect_tensor_bits("k_cache", kc, want_k, where);
    expect_tensor_bits("v_cache", vc, want_v, where);
    g_ctx->info = fmt("%d of %d tokens skipped", skipped, n_tokens);
}

void register_kv_append() {
    struct C { int n, hq, hkv, hd, bs, nb, pad, block; };
    const C cases[] = {{9, 4, 2, 128, 16, 6, 0, 128}, {5, 2, 1, 64, 32, 3, 0, 64}, {7, 3, 3, 80, 16, 4, 1, 128},
                       {12, 8, 4, 128, 8, 20, 0, 32}};
    for (DType dt : kDtypes)
        for (const C& c : cases)
            add("kv_append", fmt("%s tokens=%d heads=%d/%d hd=%d block_size=%d pad=%d block=%d", dname(dt), c.n, c.hq,
                                 c.hkv, c.hd, c.bs, c.pad, c.block),
                [=] { test_kv_append(dt, c.n, c.hq, c.hkv, c.hd, c.bs, c.nb, c.pad, c.block); });
}

// =================================================================================================
// attention: paged KV cache shared by paged_attention and prefill_attention
// =================================================================================================
constexpr int32_t kBadBlock = 0x3fffffff; // block-table entries a kernel must not use

struct PagedCache {
    int hkv, hd, bs, num_blocks, max_blocks;
    std::vector<int> lens;
    std::vector<int32_t> table; // [seq][max_blocks]
    std::unique_ptr<Tensor> k, v;
    size_t index(int s, int j, int h, int d) const {
        const size_t phys = (size_t)table[(size_t)s * max_blocks + j / bs];
        return ((phys * hkv + h) * bs + j % bs) * hd + d;
    }
};

// Physical blocks are a random permutation with spare (unreferenced) blocks; every slot that does
// not hold a token of some sequence is NaN, and table entries past a sequence's blocks are garbage.
PagedCache make_cache(Rng& r, DType dt, const std::vector<int>& lens, int hkv, int hd, int bs, bool misalign) {
    PagedCache c;
    c.hkv = hkv;
    c.hd = hd;
    c.bs = bs;
    c.lens = lens;
    int used = 0, maxb = 1;
    for (int L : lens) {
        used += (L + bs - 1) / bs;
        maxb = std::max(maxb, (L + bs - 1) / bs);
    }
    c.max_blocks = maxb + 1;
    c.num_blocks = used + 3;
    std::vector<int32_t> perm(c.num_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), r.g);
    c.table.assign(lens.size() * c.max_blocks, kBadBlock);
    int next = 0;
    for (size_t s = 0; s < lens.size(); ++s)
        for (int b = 0; b < (lens[s] + bs - 1) / bs; ++b) c.table[s * c.max_blocks + b] = perm[next++];
    const size_t elems = (size_t)c.num_blocks * hkv * bs * hd;
    c.k = std::make_unique<Tensor>("k_cache", dt, elems, misalign ? 1 : 0);
    c.v = std::make_unique<Tensor>("v_cache", dt, elems, misalign ? 1 : 0);
    c.k->fill_nan();
    c.v->fill_nan();
    for (size_t s = 0; s < lens.size(); ++s)
        for (int j = 0; j < lens[s]; ++j)
            for (int h = 0; h < hkv; ++h)
                for (int d = 0; d < hd; ++d) {
                    c.k->set(c.index((int)s, j, h, d), (float)r.normal());
                    c.v->set(c.index((int)s, j, h, d), (float)r.normal());
                }
    return c;
}

// Make key j of sequence s score about `strength` for every q head of the group of kv head kh
// (a "needle"), so that dropping or misplacing that key changes the output a lot.
void plant_needle(PagedCache& c, int s, int j, int kh, const std::vector<std::vector<float>>& group_q, double scale,
                  double strength) {
    std::vector<double> u(c.hd, 0.0);
    double mean_norm = 0.0;
    for (const auto& q : group_q) {
        double n = 0.0;
        for (float x : q) n += (double)x * x;
        n = std::sqrt(n);
        if (n == 0.0) return;
        mean_norm += n / group_q.size();
        for (int d = 0; d < c.hd; ++d) u[d] += q[d] / n;
    }
    const double beta = strength / (scale * mean_norm);
    for (int d = 0; d < c.hd; ++d) c.k->set(c.index(s, j, kh, d), (float)(beta * u[d]));
}

// softmax(scale * q . K_j) V_j over keys j < n of sequence s, kv head kh, in double.
void ref_attention(const PagedCache& c, const std::vector<float>& kv, const std::vector<float>& vv, int s, int kh,
                   const float* q, int n, double scale, double* out) {
    std::fill(out, out + c.hd, 0.0);
    if (n <= 0) return;
    std::vector<double> sc(n);
    double mx = -INFINITY;
    for (int j = 0; j < n; ++j) {
        double dot = 0.0;
        for (int d = 0; d < c.hd; ++d) dot += (double)q[d] * kv[c.index(s, j, kh, d)];
        sc[j] = dot * scale;
        mx = std::max(mx, sc[j]);
    }
    double sum = 0.0;
    for (int j = 0; j < n; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
    for (int j = 0; j < n; ++j)
        for (int d = 0; d < c.hd; ++d) out[d] += sc[j] * vv[c.index(s, j, kh, d)];
    for (int d = 0; d < c.hd; ++d) out[d] /= sum;
}

// ---- paged_attention (decode), with and without split-K ----------------------------------------
struct PagedCase {
    DType dt;
    int hd, hq, hkv, bs;
    std::vector<int> lens;
    int psize;      // split-K partition size; 0: no split
    double qscale;  // std of q elements (scores ~ N(0, qscale^2))
    bool needles;
    int q_pad;      // extra elements per q row (q_token_stride not a multiple of the vector width)
    bool misalign;  // caches off 16-byte alignment (scalar K/V loads)
};

void test_paged(const PagedCase& c) {
    Rng& r = g_ctx->rng;
    const int ns = (int)c.lens.size(), G = c.hq / c.hkv, hd = c.hd;
    const double scale = 1.0 / std::sqrt((double)hd);
    PagedCache cache = make_cache(r, c.dt, c.lens, c.hkv, hd, c.bs, c.misalign);
    const int q_stride = (c.hq + 2 * c.hkv) * hd + c.q_pad;
    Tensor q("q", c.dt, (size_t)ns * q_stride);
    q.fill_nan(); // the k/v parts of the fused QKV rows must not be read
    for (int s = 0; s < ns; ++s)
        for (int i = 0; i < c.hq * hd; ++i) q.set((size_t)s * q_stride + i, (float)(c.qscale * r.normal()));
    int maxL = 0;
    for (int L : c.lens) maxL = std::max(maxL, L);
    // Split-K geometry exactly as the Rust wrapper computes it (a single partition means no split).
    int psize = 0, maxp = 1;
    if (c.psize > 0 && (maxL + c.psize - 1) / c.psize > 1) {
        psize = c.psize;
        maxp = (maxL + c.psize - 1) / c.psize;
    }
    int needles = 0;
    if (c.needles)
        for (int s = 0; s < ns; ++s) {
            const int L = c.lens[s];
            if (L == 0) continue;
            std::set<int> at = {0, L - 1, c.bs - 1, c.bs, r.range(0, L - 1)};
            if (psize) at.insert({psize - 1, psize, std::min(L - 1, 2 * psize)});
            for (int kh = 0; kh < c.hkv; ++kh) {
                std::vector<std::vector<float>> group(G, std::vector<float>(hd));
                for (int g = 0; g < G; ++g)
                    for (int d = 0; d < hd; ++d) group[g][d] = q.get((size_t)s * q_stride + (size_t)(kh * G + g) * hd + d);
                for (int j : at)
                    if (j < L) {
                        plant_needle(cache, s, j, kh, group, scale, std::log((double)L) + c.qscale * c.qscale / 2 + 1.0);
                        ++needles;
                    }
            }
        }
    Buf<int32_t> tables("block_tables", cache.table.size()), lens("context_lens", ns);
    std::copy(cache.table.begin(), cache.table.end(), tables.data());
    std::copy(c.lens.begin(), c.lens.end(), lens.data());
    Tensor out("out", c.dt, (size_t)ns * c.hq * hd);
    out.fill_nan();
    std::unique_ptr<Buf<float>> tmp_out, tmp_max, tmp_sum;
    if (maxp > 1) {
        tmp_out = std::make_unique<Buf<float>>("tmp_out", (size_t)ns * c.hq * maxp * hd, NAN);
        tmp_max = std::make_unique<Buf<float>>("tmp_max", (size_t)ns * c.hq * maxp, NAN);
        tmp_sum = std::make_unique<Buf<float>>("tmp_sum", (size_t)ns * c.hq * maxp, NAN);
    }
    PatPagedAttentionParams p{};
    p.out = out.dev();
    p.q = q.dev();
    p.k_cache = cache.k->dev();
    p.v_cache = cache.v->dev();
    p.block_tables = tables.dev();
    p.context_lens = lens.dev();
    p.tmp_out = tmp_out ? tmp_out->dev() : 0;
    p.tmp_max = tmp_max ? tmp_max->dev() : 0;
    p.tmp_sum = tmp_sum ? tmp_sum->dev() : 0;
    p.scale = (float)scale;
    p.num_seqs = ns;
    p.num_q_heads = c.hq;
    p.num_kv_heads = c.hkv;
    p.head_dim = hd;
    p.block_size = c.bs;
    p.max_blocks_per_seq = cache.max_blocks;
    p.q_token_stride = q_stride;
    p.partition_size = psize;
    p.max_partitions = maxp;
    launch("paged_attention", K(c.dt).paged[hd_index(hd)], dim3(c.hkv, ns, maxp), dim3(PAT_PAGED_ATTN_THREADS), p);
    if (maxp > 1)
        launch("paged_attention_reduce", K(c.dt).paged_reduce, dim3(c.hq, ns), dim3(PAT_PAGED_ATTN_REDUCE_THREADS), p);

    const std::vector<float> kv = cache.k->values(), vv = cache.v->values(), qv = q.values();
    std::vector<double> ref((size_t)ns * c.hq * hd);
    for (int s = 0; s < ns; ++s)
        for (int h = 0; h < c.hq; ++h)
            ref_attention(cache, kv, vv, s, h / G, &qv[(size_t)s * q_stride + (size_t)h * hd], c.lens[s], scale,
                          &ref[((size_t)s * c.hq + h) * hd]);
    expect_close("out", out.values(), ref, kAttnTol[c.dt], [&](size_t i) {
        return fmt("seq %zu (L=%d) head %zu dim %zu", i / ((size_t)c.hq * hd), c.lens[i / ((size_t)c.hq * hd)],
                   i / hd % c.hq, i % hd);
    });
    g_ctx->info = fmt("partitions=%d needles=%d", maxp, needles);
}

void register_paged() {
    Rng reg(20240611);
    auto rl = [&](int lo, int hi) { return reg.range(lo, hi); };
    // dt, hd, hq, hkv, bs, lens, psize, qscale, needles, q_pad, misalign
    std::vector<PagedCase> cases = {
        // f32: the logic, with tight tolerances
        {F32, 128, 2, 2, 16, {1, 15, 16, 17, rl(18, 200)}, 0, 1.0, false, 0, false},
        {F32, 128, 8, 2, 16, {0, 33, rl(500, 900)}, 0, 1.0, true, 0, false},
        {F32, 128, 8, 1, 16, {rl(2000, 2600)}, 512, 1.0, true, 0, false},
        {F32, 64, 10, 2, 32, {1, 64, 65, rl(700, 1100)}, 64, 1.0, true, 0, false},
        {F32, 80, 4, 2, 16, {31, rl(200, 400)}, 0, 1.0, false, 1, false},
        {F32, 128, 3, 1, 16, {rl(2900, 3100)}, 16, 1.0, false, 0, false},
        {F32, 64, 7, 1, 8, {5, 77, 129}, 32, 2.0, true, 0, false},
        {F32, 256, 2, 1, 16, {40, rl(250, 350)}, 128, 1.0, true, 0, false},
        {F32, 128, 12, 2, 16, {17, rl(3500, 4000)}, 512, 1.0, true, 0, false},
        {F32, 96, 4, 1, 16, {rl(150, 250)}, 0, 1.0, false, 0, true},
        {F32, 128, 8, 8, 16, {rl(400, 600), 1}, 1024, 1.0, false, 0, false},
        {F32, 64, 6, 3, 16, {0, 0, rl(33, 60)}, 16, 3.0, false, 0, false},
        // bf16 / f16: loads, conversions and vector paths
        {BF16, 128, 8, 2, 16, {1, 16, 17, rl(1200, 1600)}, 0, 1.0, true, 0, false},
        {BF16, 128, 8, 1, 16, {rl(1800, 2200)}, 512, 1.0, true, 0, false},
        {BF16, 64, 4, 4, 16, {100, rl(250, 300)}, 64, 1.0, true, 0, false},
        {BF16, 80, 5, 1, 32, {rl(60, 120)}, 0, 1.0, true, 3, false},
        {BF16, 256, 1, 1, 16, {130}, 64, 1.0, true, 0, false},
        {BF16, 128, 4, 2, 16, {rl(100, 300)}, 0, 1.0, true, 0, true},
        {F16, 128, 4, 2, 16, {rl(900, 1100), 3}, 256, 1.0, true, 0, false},
        {F16, 64, 8, 1, 16, {rl(300, 400)}, 0, 1.0, true, 0, false},
        {F16, 128, 5, 1, 16, {64, rl(600, 800)}, 128, 2.0, true, 0, false},
        {F16, 256, 4, 1, 8, {50}, 0, 1.0, true, 0, false},
        {F16, 80, 6, 2, 16, {rl(100, 200)}, 32, 1.0, true, 1, true},
    };
    // random ragged batches (fixed seed), bounded work
    for (int k = 0; k < 6; ++k) {
        PagedCase c{kDtypes[reg.range(0, 2)], reg.pick(std::vector<int>{64, 80, 96, 128, 256}), 0, reg.range(1, 2),
                    reg.pick(std::vector<int>{8, 16, 32}), {}, 0, reg.pick(std::vector<double>{1.0, 2.0}),
                    reg.chance(0.6), reg.chance(0.3) ? reg.range(1, 3) : 0, reg.chance(0.2)};
        c.hq = c.hkv * reg.range(1, 8);
        const int ns = reg.range(1, 4), budget = 6000 / (c.hq * (c.hd > 128 ? 2 : 1));
        for (int s = 0; s < ns; ++s) c.lens.push_back(reg.chance(0.25) ? reg.range(0, 20) : reg.range(1, std::max(2, budget / ns)));
        if (reg.chance(0.6)) c.psize = c.bs * reg.pick(std::vector<int>{1, 2, 4, 8, 32});
        cases.push_back(c);
    }
    for (const PagedCase& c : cases) {
        const bool split = c.psize > 0;
        add(split ? "paged_attention_split" : "paged_attention",
            fmt("%s hd=%d(hd%d) G=%d (%dq/%dkv) bs=%d L=%s%s%s%s%s%s", dname(c.dt), c.hd, hd_variant(c.hd),
                c.hq / c.hkv, c.hq, c.hkv, c.bs, join(c.lens).c_str(), split ? fmt(" P=%d", c.psize).c_str() : "",
                c.qscale != 1.0 ? fmt(" qscale=%g", c.qscale).c_str() : "", c.needles ? " needles" : "",
                c.q_pad ? " q-stride+pad" : "", c.misalign ? " misaligned-cache" : ""),
            [c] { test_paged(c); });
    }
}

// ---- prefill_attention (causal, over the paged cache, with prior context) ----------------------
struct PrefillCase {
    DType dt;
    int hd, hq, hkv, bs;
    std::vector<int> qlens, priors;
    double qscale;
    int q_pad;
    bool misalign;
    bool needles;
};

void test_prefill(const PrefillCase& c) {
    Rng& r = g_ctx->rng;
    const int ns = (int)c.qlens.size(), G = c.hq / c.hkv, hd = c.hd;
    const double scale = 1.0 / std::sqrt((double)hd);
    std::vector<int> lens(ns), cu(ns + 1, 0);
    for (int s = 0; s < ns; ++s) {
        lens[s] = c.qlens[s] + c.priors[s];
        cu[s + 1] = cu[s] + c.qlens[s];
    }
    const int total = cu[ns];
    PagedCache cache = make_cache(r, c.dt, lens, c.hkv, hd, c.bs, c.misalign);
    const int q_stride = (c.hq + 2 * c.hkv) * hd + c.q_pad;
    Tensor q("q", c.dt, (size_t)total * q_stride);
    q.fill_nan();
    for (int t = 0; t < total; ++t)
        for (int i = 0; i < c.hq * hd; ++i) q.set((size_t)t * q_stride + i, (float)(c.qscale * r.normal()));
    int needles = 0;
    if (c.needles)
        for (int s = 0; s < ns; ++s) {
            if (c.qlens[s] == 0) continue;
            // key 0, the first key of the chunk and the last key; aligned with the chunk's first query
            std::set<int> at = {0, c.priors[s], lens[s] - 1};
            for (int kh = 0; kh < c.hkv; ++kh) {
                std::vector<std::vector<float>> group(G, std::vector<float>(hd));
                for (int g = 0; g < G; ++g)
                    for (int d = 0; d < hd; ++d) group[g][d] = q.get((size_t)cu[s] * q_stride + (size_t)(kh * G + g) * hd + d);
                for (int j : at) {
                    plant_needle(cache, s, j, kh, group, scale, std::log((double)lens[s] + 1) + 1.0);
                    ++needles;
                }
            }
        }
    Buf<int32_t> tables("block_tables", cache.table.size()), lens_buf("context_lens", ns), cu_buf("cu_seqlens_q", ns + 1);
    std::copy(cache.table.begin(), cache.table.end(), tables.data());
    std::copy(lens.begin(), lens.end(), lens_buf.data());
    std::copy(cu.begin(), cu.end(), cu_buf.data());
    Tensor out("out", c.dt, (size_t)total * c.hq * hd);
    out.fill_nan();
    PatPrefillAttentionParams p{out.dev(), q.dev(), cache.k->dev(), cache.v->dev(), tables.dev(), cu_buf.dev(),
                                lens_buf.dev(), (float)scale, ns, c.hq, c.hkv, hd, c.bs, cache.max_blocks, q_stride};
    const int HD = hd_variant(hd);
    const int bq = HD == 64 ? PAT_PREFILL_BQ_HD64 : HD == 128 ? PAT_PREFILL_BQ_HD128 : PAT_PREFILL_BQ_HD256;
    const int maxq = *std::max_element(c.qlens.begin(), c.qlens.end());
    launch("prefill_attention", K(c.dt).prefill[hd_index(hd)], dim3((maxq + bq - 1) / bq, c.hq, ns),
           dim3(PAT_PREFILL_ATTN_THREADS), p);

    const std::vector<float> kv = cache.k->values(), vv = cache.v->values(), qv = q.values();
    std::vector<double> ref((size_t)total * c.hq * hd);
    std::vector<int> row_seq(total);
    for (int s = 0; s < ns; ++s)
        for (int i = 0; i < c.qlens[s]; ++i) {
            const int row = cu[s] + i;
            row_seq[row] = s;
            for (int h = 0; h < c.hq; ++h)
                ref_attention(cache, kv, vv, s, h / G, &qv[(size_t)row * q_stride + (size_t)h * hd],
                              c.priors[s] + i + 1, scale, &ref[((size_t)row * c.hq + h) * hd]);
        }
    expect_close("out", out.values(), ref, kAttnTol[c.dt], [&](size_t i) {
        const size_t row = i / ((size_t)c.hq * hd);
        const int s = row_seq[row];
        return fmt("seq %d query %zu (of %d, prior %d) head %zu dim %zu", s, row - cu[s], c.qlens[s], c.priors[s],
                   i / hd % c.hq, i % hd);
    });
    g_ctx->info = fmt("CTAs=%d needles=%d", (maxq + bq - 1) / bq * c.hq * ns, needles);
}

void register_prefill() {
    Rng reg(77001);
    auto rl = [&](int lo, int hi) { return reg.range(lo, hi); };
    // dt, hd, hq, hkv, bs, qlens, priors, qscale, q_pad, misalign, needles
    std::vector<PrefillCase> cases = {
        {F32, 128, 4, 2, 16, {1, 15, 17, rl(60, 80)}, {0, 5, 0, 64}, 1.0, 0, false, false},
        {F32, 64, 8, 1, 16, {64, 65, rl(120, 140)}, {0, 7, rl(250, 350)}, 1.0, 0, false, true},
        {F32, 128, 5, 1, 32, {rl(90, 110)}, {rl(900, 1100)}, 1.0, 0, false, true},
        {F32, 80, 2, 2, 16, {33, 16}, {0, 40}, 2.0, 1, false, false},
        {F32, 256, 2, 1, 16, {17, rl(30, 50)}, {3, 100}, 1.0, 0, false, true},
        {F32, 96, 4, 1, 8, {9}, {rl(200, 300)}, 1.0, 0, true, false},
        {F32, 64, 3, 3, 16, {1, 1, 0, 1}, {0, rl(400, 600), 12, 31}, 1.0, 0, false, true},
        {F32, 128, 8, 1, 16, {rl(150, 200)}, {0}, 3.0, 0, false, false},
        {BF16, 128, 8, 1, 16, {rl(90, 110), 3}, {20, 0}, 1.0, 0, false, true},
        {BF16, 64, 6, 2, 16, {65}, {64}, 1.0, 0, false, true},
        {BF16, 256, 4, 4, 16, {20}, {10}, 1.0, 0, false, true},
        {BF16, 80, 5, 1, 32, {rl(40, 60)}, {rl(10, 20)}, 1.0, 2, true, true},
        {F16, 128, 4, 1, 16, {40, 64}, {rl(250, 350), 0}, 1.0, 0, false, true},
        {F16, 64, 2, 1, 16, {rl(60, 70)}, {rl(100, 130)}, 2.0, 0, false, true},
        {F16, 256, 2, 2, 8, {18}, {5}, 1.0, 0, false, true},
    };
    for (int k = 0; k < 4; ++k) { // random ragged batches (fixed seed), bounded work
        PrefillCase c{kDtypes[reg.range(0, 2)], reg.pick(std::vector<int>{64, 80, 96, 128, 256}), 0, reg.range(1, 2),
                      reg.pick(std::vector<int>{8, 16, 32}), {}, {}, reg.pick(std::vector<double>{1.0, 2.0}),
                      reg.chance(0.3) ? reg.range(1, 3) : 0, reg.chance(0.2), reg.chance(0.6)};
        c.hq = c.hkv * reg.range(1, 8);
        const int ns = reg.range(1, 3);
        for (int s = 0; s < ns; ++s) {
            c.qlens.push_back(reg.chance(0.2) ? 1 : reg.range(1, 130 / ns));
            c.priors.push_back(reg.chance(0.3) ? 0 : reg.range(1, 400));
        }
        cases.push_back(c);
    }
    for (const PrefillCase& c : cases)
        add("prefill_attention",
            fmt("%s hd=%d(hd%d) G=%d (%dq/%dkv) bs=%d q=%s prior=%s%s%s%s%s", dname(c.dt), c.hd, hd_variant(c.hd),
                c.hq / c.hkv, c.hq, c.hkv, c.bs, join(c.qlens).c_str(), join(c.priors).c_str(),
                c.qscale != 1.0 ? fmt(" qscale=%g", c.qscale).c_str() : "", c.needles ? " needles" : "",
                c.q_pad ? " q-stride+pad" : "", c.misalign ? " misaligned-cache" : ""),
            [c] { test_prefill(c); });
}

// =================================================================================================
// argmax and sample
// =================================================================================================
// Reference argmax: NaN counts as -inf, ties go to the lowest index, empty/all -inf rows give 0.
uint32_t ref_argmax(const std::vector<float>& x, float* val = nullptr) {
    float best = -INFINITY;
    uint32_t bi = 0;
    for (size_t i = 0; i < x.size(); ++i) {
        const float v = std::isnan(x[i]) ? -INFINITY : x[i];
        if (v > best) { best = v; bi = (uint32_t)i; }
    }
    if (val) *val = best;
    return bi;
}

// Reference sampler, by sorting (sampling.cu's header is the spec): fixed-point weights
// floor(exp((x - max) / T) * 2^32); top-k keeps values >= the k-th largest; top-p keeps the fewest
// largest values (ties kept together) whose mass reaches ceil(top_p * Z); the draw is the smallest
// index whose running kept mass exceeds floor(u * Z_kept).
uint32_t ref_sample(const std::vector<float>& raw, float temperature, float top_p, int top_k, float u_in) {
    const int n = (int)raw.size();
    if (!(temperature > 0.0f) || n <= 1) return ref_argmax(raw);
    std::vector<float> x(n);
    for (int i = 0; i < n; ++i) x[i] = std::isnan(raw[i]) ? -INFINITY : raw[i];
    const float mx = *std::max_element(x.begin(), x.end());
    if (mx == -INFINITY) return 0;
    const float inv_t = 1.0f / temperature;
    std::vector<uint64_t> w(n);
    // the maximum weighs exp(0) = 1 also when it is +inf (rows with +inf draw among their +inf entries)
    for (int i = 0; i < n; ++i) w[i] = x[i] == mx ? 4294967296ull : (uint64_t)(std::exp((x[i] - mx) * inv_t) * 4294967296.0f);
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return x[a] > x[b]; });
    std::vector<char> keep(n, 1);
    if (top_k > 0 && top_k < n) {
        const float kth = x[order[top_k - 1]];
        for (int i = 0; i < n; ++i) keep[i] = x[i] >= kth;
    }
    if (top_p < 1.0f) {
        uint64_t z = 0;
        for (int i = 0; i < n; ++i) z += keep[i] ? w[i] : 0;
        const double t = std::ceil((double)std::max(top_p, 0.0f) * (double)z);
        const uint64_t target = t < 1.0 ? 1 : (uint64_t)t;
        uint64_t cum = 0;
        float tau = -INFINITY;
        for (int a = 0; a < n;) {
            int b = a;
            uint64_t mass = 0;
            for (; b < n && x[order[b]] == x[order[a]]; ++b) mass += keep[order[b]] ? w[order[b]] : 0;
            cum += mass;
            if (cum >= target) { tau = x[order[a]]; break; }
            a = b;
        }
        for (int i = 0; i < n; ++i) keep[i] = keep[i] && x[i] >= tau;
    }
    uint64_t zk = 0;
    for (int i = 0; i < n; ++i) zk += keep[i] ? w[i] : 0;
    const float u = std::min(std::max(u_in, 0.0f), 1.0f);
    uint64_t target = (uint64_t)((double)u * (double)zk);
    if (target >= zk) target = zk - 1;
    uint64_t run = 0;
    for (int i = 0; i < n; ++i)
        if (keep[i] && (run += w[i]) > target) return (uint32_t)i;
    return 0xffffffffu; // unreachable: the maximum is always kept
}

// Logits rows with the special cases of the kernels' contract, one per row (cycling).
void fill_logits(Rng& r, Tensor& lg, int rows, int vocab, int stride, bool specials) {
    for (int row = 0; row < rows; ++row) {
        const size_t b = (size_t)row * stride;
        for (int i = 0; i < vocab; ++i) lg.set(b + i, (float)(2.0 * r.normal()));
        for (int i = vocab; i < stride; ++i) lg.set(b + i, INFINITY); // past vocab: must be ignored
        if (!specials || vocab < 4) continue;
        auto at = [&](int i) { return b + (size_t)i; };
        switch (row % 6) {
        case 0: { // the maximum three times, in different threads' ranges and at the end
            const int a = r.range(0, vocab / 2), c = r.range(vocab / 2, vocab - 2);
            for (int i : {c, a, vocab - 1}) lg.set(at(i), 9.5f);
            break;
        }
        case 1: // NaN at 0 and scattered, tie at the top
            lg.set(at(0), NAN);
            for (int k = 0; k < 5; ++k) lg.set(at(r.range(0, vocab - 1)), NAN);
            lg.set(at(vocab - 2), 8.0f);
            lg.set(at(r.range(1, vocab - 3)), 8.0f);
            break;
        case 2: // all NaN
            for (int i = 0; i < vocab; ++i) lg.set(at(i), NAN);
            break;
        case 3: // all -inf but one NaN
            for (int i = 0; i < vocab; ++i) lg.set(at(i), -INFINITY);
            lg.set(at(vocab / 2), NAN);
            break;
        case 4: // +inf twice, -inf sprinkled
            for (int k = 0; k < 5; ++k) lg.set(at(r.range(0, vocab - 1)), -INFINITY);
            lg.set(at(vocab - 1), INFINITY);
            lg.set(at(vocab / 3), INFINITY);
            break;
        default: // all equal
            for (int i = 0; i < vocab; ++i) lg.set(at(i), 0.25f);
            break;
        }
    }
}

void test_argmax(DType dt, int rows, int vocab, int pad, bool with_val, int offset) {
    Rng& r = g_ctx->rng;
    const int stride = vocab + pad;
    Tensor lg("logits", dt, (size_t)std::max(1, rows * stride));
    fill_logits(r, lg, rows, vocab, stride, true);
    Buf<uint32_t> idx("out_idx", rows, 0xdeadbeefu);
    Buf<float> val("out_val", rows, NAN);
    PatArgmaxParams p{lg.dev(), idx.dev(), with_val ? val.dev() : 0, rows, vocab, stride, offset};
    launch("argmax", K(dt).argmax, dim3(rows), dim3(PAT_SAMPLE_THREADS), p);
    std::vector<uint32_t> want_idx(rows);
    std::vector<float> want_val(rows, NAN);
    for (int row = 0; row < rows; ++row) {
        std::vector<float> x(vocab);
        for (int i = 0; i < vocab; ++i) x[i] = lg.get((size_t)row * stride + i);
        want_idx[row] = ref_argmax(x, with_val ? &want_val[row] : nullptr) + (uint32_t)offset;
    }
    expect_bits("out_idx", idx.data(), want_idx.data(), rows, 4, [](size_t i) { return fmt("row %zu", i); });
    expect_bits("out_val", val.data(), want_val.data(), rows, 4, [](size_t i) { return fmt("row %zu", i); });
}

struct SampleCase {
    DType dt;
    int rows, vocab, pad;
    float temperature, top_p;
    int top_k;
    bool specials;
};

void test_sample(const SampleCase& c) {
    Rng& r = g_ctx->rng;
    const int stride = c.vocab + c.pad;
    Tensor lg("logits", c.dt, (size_t)c.rows * stride);
    fill_logits(r, lg, c.rows, c.vocab, stride, c.specials);
    // ties in ordinary rows: copy values onto other indices (around the top and the k-th value)
    for (int row = 0; row < c.rows; ++row) {
        if (c.specials && row % 6 != 0 && row % 6 != 4) continue;
        for (int k = 0; k < 8 && c.vocab > 2; ++k) {
            const size_t src = (size_t)row * stride + r.range(0, c.vocab - 1);
            lg.set((size_t)row * stride + r.range(0, c.vocab - 1), lg.get(src));
        }
    }
    std::vector<std::vector<float>> rowv(c.rows, std::vector<float>(c.vocab));
    for (int row = 0; row < c.rows; ++row)
        for (int i = 0; i < c.vocab; ++i) rowv[row][i] = lg.get((size_t)row * stride + i);
    const std::vector<float> fixed_u = {0.0f, 0.5f, 0.99999994f, 1e-7f};
    int draws = 0, distinct = 0;
    std::set<uint32_t> seen;
    for (int launch_no = 0; launch_no < 3; ++launch_no) {
        Buf<float> u("uniforms", c.rows);
        for (int row = 0; row < c.rows; ++row)
            u[row] = (row + launch_no) % 3 == 0 ? fixed_u[(size_t)(row + launch_no) % fixed_u.size()] : (float)r.uniform();
        Buf<uint32_t> out("out_idx", c.rows, 0xdeadbeefu);
        PatSampleParams p{lg.dev(), out.dev(), u.dev(), c.temperature, c.top_p, c.top_k, c.rows, c.vocab, stride};
        launch("sample", K(c.dt).sample, dim3(c.rows), dim3(PAT_SAMPLE_THREADS), p);
        std::vector<uint32_t> want(c.rows);
        for (int row = 0; row < c.rows; ++row) {
            want[row] = ref_sample(rowv[row], c.temperature, c.top_p, c.top_k, u[row]);
            seen.insert(out[row]);
            ++draws;
        }
        expect_bits(fmt("out_idx (launch %d)", launch_no), out.data(), want.data(), c.rows, 4, [&](size_t i) {
            return fmt("row %zu u=%.9g", i, u[i]);
        });
    }
    distinct = (int)seen.size();
    g_ctx->info = fmt("%d draws, %d distinct tokens", draws, distinct);
}

void register_sampling() {
    struct A { int rows, vocab, pad; bool val; int offset; };
    const A am[] = {{6, 1000, 8, true, 0}, {6, 1025, 0, false, 5000}, {3, 7, 1, true, 17}, {2, 1, 0, true, 0},
                    {1, 0, 4, true, 3}};
    for (DType dt : kDtypes)
        for (const A& a : am)
            add("argmax", fmt("%s rows=%d vocab=%d stride=%d%s offset=%d", dname(dt), a.rows, a.vocab, a.vocab + a.pad,
                              a.val ? " out_val" : "", a.offset),
                [=] { test_argmax(dt, a.rows, a.vocab, a.pad, a.val, a.offset); });
    for (DType dt : {F32, BF16})
        add("argmax", fmt("%s rows=2 vocab=151936 stride=151936", dname(dt)), [=] { test_argmax(dt, 2, 151936, 0, true, 0); });

    // dt, rows, vocab, pad, T, top_p, top_k, specials
    const std::vector<SampleCase> cases = {
        {F32, 6, 1000, 8, 1.0f, 1.0f, 0, true},    {F32, 4, 777, 0, 0.7f, 1.0f, 40, false},
        {F32, 4, 1000, 0, 1.3f, 0.9f, 0, false},   {F32, 6, 2048, 3, 1.0f, 0.8f, 50, true},
        {F32, 4, 500, 0, 0.5f, 1e-6f, 0, false},   {F32, 4, 300, 0, 1.0f, 1.0f, 1, false},
        {F32, 6, 1000, 0, 0.0f, 1.0f, 0, true},    {F32, 3, 1000, 0, -1.0f, 0.5f, 10, false},
        {F32, 4, 640, 0, 1.0f, 0.95f, 640, false}, {F32, 4, 640, 0, 1.0f, 0.95f, 639, false},
        {F32, 3, 1, 0, 1.0f, 0.9f, 0, false},      {F32, 3, 2, 0, 1.0f, 1.0f, 0, false},
        {F32, 2, 32000, 0, 0.8f, 0.9f, 100, false},
        {F32, 12, 1000, 0, 5.0f, 1.0f, 3, false},  {F32, 12, 500, 0, 3.0f, 0.3f, 0, false},
        {F32, 12, 800, 0, 4.0f, 0.5f, 30, false},
        {BF16, 6, 1000, 8, 1.0f, 1.0f, 0, true},   {BF16, 4, 4096, 0, 0.7f, 0.9f, 40, false},
        {BF16, 4, 777, 0, 1.0f, 0.5f, 0, false},   {BF16, 4, 1000, 0, 1.0f, 1.0f, 1, false},
        {BF16, 2, 32000, 0, 1.0f, 0.95f, 0, false},
        {BF16, 12, 1000, 0, 4.0f, 1.0f, 20, false},
        {F16, 6, 1000, 8, 1.0f, 1.0f, 0, true},    {F16, 4, 1500, 0, 0.9f, 0.7f, 25, false},
        {F16, 4, 1000, 0, 0.0f, 1.0f, 0, false},   {F16, 4, 999, 0, 2.0f, 0.99f, 0, false},
        {F16, 12, 700, 0, 6.0f, 0.4f, 5, false},
    };
    for (const SampleCase& c : cases)
        add("sample", fmt("%s rows=%d vocab=%d stride=%d T=%g top_p=%g top_k=%d%s", dname(c.dt), c.rows, c.vocab,
                          c.vocab + c.pad, c.temperature, c.top_p, c.top_k, c.specials ? " specials" : ""),
            [c] { test_sample(c); });
}

// =================================================================================================
// all_reduce_sum
// =================================================================================================
void test_all_reduce(DType dt, int k, int64_t n, int mode, bool misalign, int grid, int block) {
    // mode 0: separate outputs (3 of them); 1: in place, outputs == inputs; 2: out[0] = in[k-1], out[1] separate
    Rng& r = g_ctx->rng;
    std::vector<std::unique_ptr<Tensor>> in, sep;
    PatAllReduceParams p{};
    p.n_elems = n;
    p.num_inputs = k;
    for (int i = 0; i < k; ++i) {
        in.push_back(std::make_unique<Tensor>(fmt("input%d", i), dt, (size_t)n, misalign && i == k / 2 ? 1 : 0));
        // magnitudes 1e-4..1e4 (f16: 1e-3..1e3) so that the f32 sum's rounding depends on the order
        const int e = dt == F16 ? 3 : 4;
        in.back()->fill_normal(r, std::pow(10.0, r.range(-e, e)));
        p.inputs[i] = in.back()->dev();
    }
    std::vector<std::vector<float>> in0;
    for (auto& t : in) in0.push_back(t->values());
    std::vector<const Tensor*> outs;
    auto separate = [&] {
        sep.push_back(std::make_unique<Tensor>(fmt("output%zu", sep.size()), dt, (size_t)n));
        sep.back()->fill_nan();
        return sep.back().get();
    };
    if (mode == 0) for (int j = 0; j < 3; ++j) outs.push_back(separate());
    else if (mode == 1) for (int i = 0; i < k; ++i) outs.push_back(in[i].get());
    else { outs.push_back(in[k - 1].get()); outs.push_back(separate()); }
    p.num_outputs = (int)outs.size();
    for (size_t j = 0; j < outs.size(); ++j) p.outputs[j] = outs[j]->dev();
    launch("all_reduce_sum", K(dt).all_reduce, dim3(grid), dim3(block), p);
    std::vector<float> want((size_t)n);
    for (int64_t e = 0; e < n; ++e) {
        float acc = 0.0f; // f32, rank order, one rounding
        for (int i = 0; i < k; ++i) acc += in0[i][e];
        want[e] = round_to(dt, acc);
    }
    for (size_t j = 0; j < outs.size(); ++j) expect_tensor_bits(fmt("outputs[%zu]", j), *outs[j], want);
    for (int i = 0; i < k; ++i) {
        bool is_out = false;
        for (const Tensor* o : outs) is_out = is_out || o == in[i].get();
        if (!is_out) expect_tensor_bits(fmt("inputs[%d] (must be unchanged)", i), *in[i], in0[i]);
    }
}

void register_all_reduce() {
    struct C { int k; int64_t n; int mode; bool mis; int grid, block; };
    const C cases[] = {{1, 7, 0, false, 1, 256},    {2, 4096, 0, false, 4, 256},     {3, 1001, 1, false, 2, 64},
                       {8, 100000, 2, false, 8, 256}, {16, 4096, 1, true, 3, 128},   {16, 77, 0, false, 1, 32},
                       {5, 4096, 0, false, 2, 128},   {12, 40000, 1, false, 16, 256}, {7, 100003, 2, false, 5, 64}};
    const char* modes[] = {"3 separate outputs", "in place", "out[0]=in[k-1] + separate"};
    for (DType dt : kDtypes)
        for (const C& c : cases)
            add("all_reduce", fmt("%s k=%d n=%lld %s%s grid=%d block=%d", dname(dt), c.k, (long long)c.n, modes[c.mode],
                                  c.mis ? " misaligned-input" : "", c.grid, c.block),
                [=] { test_all_reduce(dt, c.k, c.n, c.mode, c.mis, c.grid, c.block); });
}

// =================================================================================================
// reshard.cu: strided_copy, kv_gather, kv_scatter, kv_copy
// =================================================================================================
void fill_bytes(Rng& r, unsigned char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) p[i] = (unsigned char)r.g();
}

// One strided_copy launch; the reference applies the rows from a snapshot taken before the launch
// (what a correct launch without read/write overlap produces).
void run_copy(Buf<unsigned char>& buf_dst, size_t dst_off, const Buf<unsigned char>& buf_src, size_t src_off,
              int64_t rows, int64_t row_bytes, int64_t dst_stride, int64_t src_stride, dim3 grid,
              std::vector<unsigned char>& model_dst, const std::vector<unsigned char>& model_src) {
    PatStridedCopyParams p{buf_dst.dev(dst_off), buf_src.dev(src_off), rows, row_bytes, dst_stride, src_stride};
    launch("strided_copy", strided_copy, grid, dim3(256), p);
    const std::vector<unsigned char> snap = model_src;
    for (int64_t row = 0; row < rows; ++row)
        std::memcpy(&model_dst[dst_off + row * dst_stride], &snap[src_off + row * src_stride], (size_t)row_bytes);
}

void test_strided_copy(int64_t rows, int64_t row_bytes, int64_t src_stride, int64_t dst_stride, size_t src_off,
                       size_t dst_off, dim3 grid) {
    Rng& r = g_ctx->rng;
    const size_t src_n = src_off + (rows - 1) * src_stride + row_bytes + 64;
    const size_t dst_n = dst_off + (rows - 1) * dst_stride + row_bytes + 64;
    Buf<unsigned char> src("src", src_n), dst("dst", dst_n);
    fill_bytes(r, src.data(), src_n);
    fill_bytes(r, dst.data(), dst_n);
    std::vector<unsigned char> model_dst = dst.copy();
    const std::vector<unsigned char> model_src = src.copy();
    run_copy(dst, dst_off, src, src_off, rows, row_bytes, dst_stride, src_stride, grid, model_dst, model_src);
    expect_bits("dst", dst.data(), model_dst.data(), dst_n, 1);
    expect_bits("src (must be unchanged)", src.data(), model_src.data(), src_n, 1);
}

// In-place compaction recipes from reshard.cu's header, on one buffer.
void test_compaction(int kind, int64_t a, int64_t b, size_t base_off) {
    Rng& r = g_ctx->rng;
    const size_t n = base_off + 4096 + (size_t)(kind == 0 ? a + b : a * b) + 64;
    Buf<unsigned char> buf("buffer", n);
    fill_bytes(r, buf.data(), n);
    const std::vector<unsigned char> orig = buf.copy();
    std::vector<unsigned char> model = orig;
    int launches = 0;
    if (kind == 0) { // contiguous move of a bytes down by b bytes (chunks of b if b < a, ascending)
        const size_t from = base_off + (size_t)b;
        for (int64_t off = 0; off < a; off += b) {
            const int64_t len = std::min<int64_t>(b, a - off);
            run_copy(buf, from - b + off, buf, from + off, 1, len, 0, 0, dim3(3), model, model);
            ++launches;
        }
        expect_bits("moved bytes", buf.data() + base_off, orig.data() + from, (size_t)a, 1);
    } else { // a rows of stride b keep their first half: row 0 stays, then rows [1,2), [2,4), [4,8), ...
        const int64_t half = b / 2;
        for (int64_t lo = 1; lo < a; lo *= 2) {
            const int64_t hi = std::min<int64_t>(a, 2 * lo);
            run_copy(buf, base_off + lo * half, buf, base_off + lo * b, hi - lo, half, half, b, dim3(2, 3), model, model);
            ++launches;
        }
        std::vector<unsigned char> want((size_t)(a * half));
        for (int64_t row = 0; row < a; ++row) std::memcpy(&want[row * half], &orig[base_off + row * b], (size_t)half);
        expect_bits("compacted rows", buf.data() + base_off, want.data(), want.size(), 1);
    }
    expect_bits("whole buffer", buf.data(), model.data(), n, 1);
    g_ctx->info = fmt("%d launches", launches);
}

// kv_gather to staging, kv_scatter from it into another layout, and kv_copy straight between the
// two layouts (which must give what the scatter gave). Grid: the launchers' (ceil(nlist / 4), 2)
// plus `extra`, or `gx` CTAs along x when gx > 0 (fewer than the work: they grid-stride).
void test_kv_gather_scatter(int eb, int nb, int heads, int h0, int nh, int bs, int hd, int nlist, int heads2, int h02,
                            size_t misalign, dim3 extra, unsigned gx) {
    const dim3 grid(gx > 0 ? gx : (unsigned)(nlist + 3) / 4 + extra.x, 2 + extra.y);
    Rng& r = g_ctx->rng;
    const size_t head_bytes = (size_t)bs * hd * eb, chunk = head_bytes * nh, cache_bytes = (size_t)nb * heads * head_bytes;
    Buf<unsigned char> kc("k_cache", cache_bytes, 0, misalign), vc("v_cache", cache_bytes, 0, misalign);
    fill_bytes(r, kc.data(), cache_bytes);
    fill_bytes(r, vc.data(), cache_bytes);
    std::vector<int32_t> perm(nb);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), r.g);
    Buf<int32_t> ids("block_ids", nlist);
    for (int i = 0; i < nlist; ++i) ids[i] = perm[i];
    Buf<unsigned char> staging("staging", 2 * nlist * chunk, 0xee);
    PatKvGatherParams g{kc.dev(), vc.dev(), staging.dev(), ids.dev(), nlist, heads, h0, nh, bs, hd, eb, 0};
    launch("kv_gather", kv_gather, grid, dim3(256), g);
    std::vector<unsigned char> want(2 * nlist * chunk);
    for (int kv = 0; kv < 2; ++kv)
        for (int i = 0; i < nlist; ++i)
            std::memcpy(&want[(kv * nlist + i) * chunk], (kv ? vc : kc).data() + ((size_t)ids[i] * heads + h0) * head_bytes, chunk);
    expect_bits("staging", staging.data(), want.data(), want.size(), 1);

    // scatter into another layout (e.g. another TP degree): other block ids and head offset
    const int nb2 = nlist + 4;
    const size_t cache2 = (size_t)nb2 * heads2 * head_bytes;
    Buf<unsigned char> k2("k_cache2", cache2), v2("v_cache2", cache2);
    fill_bytes(r, k2.data(), cache2);
    fill_bytes(r, v2.data(), cache2);
    std::vector<unsigned char> wk = k2.copy(), wv = v2.copy();
    Buf<unsigned char> k3("k_cache3", cache2), v3("v_cache3", cache2);
    std::memcpy(k3.data(), wk.data(), cache2);
    std::memcpy(v3.data(), wv.data(), cache2);
    std::vector<int32_t> perm2(nb2);
    std::iota(perm2.begin(), perm2.end(), 0);
    std::shuffle(perm2.begin(), perm2.end(), r.g);
    Buf<int32_t> ids2("block_ids2", nlist);
    for (int i = 0; i < nlist; ++i) ids2[i] = perm2[i];
    PatKvGatherParams s{k2.dev(), v2.dev(), staging.dev(), ids2.dev(), nlist, heads2, h02, nh, bs, hd, eb, 0};
    launch("kv_scatter", kv_scatter, grid, dim3(256), s);
    for (int kv = 0; kv < 2; ++kv)
        for (int i = 0; i < nlist; ++i)
            std::memcpy((kv ? wv : wk).data() + ((size_t)ids2[i] * heads2 + h02) * head_bytes, &want[(kv * nlist + i) * chunk], chunk);
    expect_bits("k_cache2", k2.data(), wk.data(), cache2, 1);
    expect_bits("v_cache2", v2.data(), wv.data(), cache2, 1);

    PatKvCopyParams c{kc.dev(), vc.dev(), k3.dev(), v3.dev(), ids.dev(), ids2.dev(), nlist, heads, h0, heads2, h02,
                      nh, bs, hd, eb, 0};
    launch("kv_copy", kv_copy, grid, dim3(256), c);
    expect_bits("kv_copy k_cache3", k3.data(), wk.data(), cache2, 1);
    expect_bits("kv_copy v_cache3", v3.data(), wv.data(), cache2, 1);
    g_ctx->info = fmt("chunk=%zu bytes, grid %ux%u", chunk, grid.x, grid.y);
}

void register_reshard() {
    struct C { int64_t rows, rb, ss, ds; size_t so, doff; dim3 grid; };
    const C cases[] = {
        {1, 65536, 0, 0, 0, 0, dim3(16, 1)},        // one contiguous move, 16-byte units
        {2, 1048592, 1048608, 1048592, 16, 0, dim3(3, 1)}, // many 4-unit steps per thread, partial last
        {37, 48, 96, 64, 16, 32, dim3(2, 5)},       // 16-byte units, grid.y < rows
        {300, 24, 40, 24, 8, 0, dim3(1, 7)},        // 8-byte units
        {53, 12, 20, 16, 4, 12, dim3(3, 2)},        // 4-byte units
        {41, 13, 29, 17, 3, 5, dim3(2, 64)},        // 1-byte units, grid.y > rows
        {5, 100000, 100003, 100001, 1, 0, dim3(40, 2)}, // long odd rows
        {3, 0, 16, 16, 0, 0, dim3(1, 1)},           // nothing to copy
        {4, 4096, 4096, 4096, 4, 0, dim3(2, 2)},    // only src is 4-byte aligned
        {6, 64, 72, 64, 0, 0, dim3(1, 3)},          // only src_stride is 8-byte aligned
        {9, 32, 32, 48, 16, 2, dim3(1, 4)},         // only dst is 2-byte aligned
    };
    for (const C& c : cases)
        add("strided_copy", fmt("rows=%lld row_bytes=%lld strides src=%lld dst=%lld offsets %zu/%zu grid=%ux%u",
                                (long long)c.rows, (long long)c.rb, (long long)c.ss, (long long)c.ds, c.so, c.doff,
                                c.grid.x, c.grid.y),
            [=] { test_strided_copy(c.rows, c.rb, c.ss, c.ds, c.so, c.doff, c.grid); });
    add("strided_copy", "no-op: dst == src with equal strides", [] {
        Rng& r = g_ctx->rng;
        Buf<unsigned char> b("buffer", 4096);
        fill_bytes(r, b.data(), 4096);
        const std::vector<unsigned char> orig = b.copy();
        PatStridedCopyParams p{b.dev(16), b.dev(16), 8, 300, 500, 500};
        launch("strided_copy", strided_copy, dim3(2, 2), dim3(256), p);
        expect_bits("buffer", b.data(), orig.data(), 4096, 1);
    });
    add("strided_copy", "in-place contiguous move down by shift >= size (one launch)", [] { test_compaction(0, 5000, 6000, 16); });
    add("strided_copy", "in-place contiguous move down by shift < size (chunks)", [] { test_compaction(0, 50000, 4096, 0); });
    add("strided_copy", "in-place contiguous move, odd sizes", [] { test_compaction(0, 9999, 1237, 3); });
    add("strided_copy", "in-place row compaction (keep first half of 37 rows of 512 B)", [] { test_compaction(1, 37, 512, 0); });
    add("strided_copy", "in-place row compaction, odd stride (100 rows of 26 B)", [] { test_compaction(1, 100, 26, 1); });

    struct G { int eb, nb, heads, h0, nh, bs, hd, nlist, heads2, h02; size_t mis; dim3 extra; unsigned gx; };
    const G gs[] = {
        {2, 9, 8, 2, 4, 16, 128, 3, 4, 0, 0, dim3(0, 0), 0},   // 16-byte units
        {4, 7, 4, 1, 2, 16, 80, 5, 2, 0, 0, dim3(1, 1), 0},    // extra CTAs must do nothing
        {2, 6, 3, 1, 1, 1, 3, 4, 5, 4, 0, dim3(0, 0), 0},      // 6-byte chunks: 1-byte units
        {2, 5, 2, 1, 1, 1, 2, 3, 2, 1, 0, dim3(0, 1), 0},      // 4-byte units
        {4, 5, 6, 3, 3, 2, 1, 2, 3, 0, 0, dim3(0, 0), 0},      // 24-byte chunks: 8-byte units
        {2, 8, 4, 0, 4, 16, 64, 6, 8, 4, 2, dim3(0, 0), 0},    // misaligned cache
        {2, 40, 8, 5, 1, 16, 128, 37, 1, 0, 0, dim3(0, 0), 0}, // a switch's batch: one head, 37 blocks
        {2, 40, 8, 5, 1, 16, 128, 37, 2, 1, 0, dim3(0, 0), 2}, // 2 CTAs for 10 groups: grid-stride
        {4, 12, 4, 1, 2, 16, 128, 11, 2, 0, 0, dim3(0, 0), 1}, // one CTA; 16 KiB chunks: 4 units a thread
    };
    for (const G& g : gs)
        add("kv_gather_scatter", fmt("elem=%dB blocks=%d/%d heads [%d,%d) of %d -> at %d of %d block_size=%d hd=%d%s%s%s",
                                     g.eb, g.nlist, g.nb, g.h0, g.h0 + g.nh, g.heads, g.h02, g.heads2, g.bs, g.hd,
                                     g.mis ? " misaligned" : "", g.extra.x + g.extra.y ? " extra-CTAs" : "",
                                     g.gx ? " small-grid" : ""),
            [=] { test_kv_gather_scatter(g.eb, g.nb, g.heads, g.h0, g.nh, g.bs, g.hd, g.nlist, g.heads2, g.h02, g.mis, g.extra, g.gx); });
}

// =================================================================================================
// runner
// =================================================================================================
struct Options {
    int jobs = 1;
    std::vector<std::string> filters;
    bool list = false, verbose = false, fork = true;
    uint64_t seed = 1;
    int timeout = 300;
};

struct Outcome {
    bool ok = false;
    std::string detail, output;
    double secs = 0.0;
};

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs one test in this process; prints failure details, returns the outcome.
Outcome run_here(const TestCase& t, uint64_t seed) {
    Ctx ctx;
    ctx.rng = Rng(hash_str(t.name) ^ (seed * 0x9e3779b97f4a7c15ull));
    g_ctx = &ctx;
    emu::set_seed(hash_str(t.name) + seed);
    Outcome o;
    const double t0 = now_s();
    try {
        t.run();
    } catch (const std::exception& e) {
        ctx.failures.push_back(e.what());
    }
    o.secs = now_s() - t0;
    g_ctx = nullptr;
    o.ok = ctx.failures.empty();
    if (o.ok) {
        o.detail = ctx.info;
        if (ctx.checks && ctx.worst > 0)
            o.detail += (o.detail.empty() ? "" : ", ") + fmt("max err %.2f of tol", ctx.worst);
    } else {
        o.detail = ctx.failures[0];
        if (ctx.failures.size() > 1) o.detail += fmt(" (+%zu more)", ctx.failures.size() - 1);
        for (const std::string& f : ctx.failures) o.output += "  " + f + "\n";
    }
    return o;
}

std::string last_line(const std::string& s) {
    const size_t rt = s.find("runtime error:"); // UBSan's message line
    if (rt != std::string::npos) {
        const size_t b = s.rfind('\n', rt), e = s.find('\n', rt);
        return s.substr(b == std::string::npos ? 0 : b + 1, e == std::string::npos ? std::string::npos : e - b - 1).substr(0, 400);
    }
    size_t end = s.size();
    while (end > 0) {
        const size_t b = s.rfind('\n', end - 1);
        const size_t start = b == std::string::npos ? 0 : b + 1;
        std::string line = s.substr(start, end - start);
        if (line.find_first_not_of(" \t\r") != std::string::npos) return line.substr(0, 400);
        if (b == std::string::npos) break;
        end = b;
    }
    return "";
}

struct Child {
    pid_t pid;
    int fd;
    size_t index;
    std::string out;
    double start;
    bool killed = false;
};

Outcome finish_child(Child& c, int status, int timeout) {
    Outcome o;
    o.secs = now_s() - c.start;
    o.output = c.out;
    const size_t m = c.out.rfind("@@RESULT ");
    if (m != std::string::npos && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        const size_t eol = c.out.find('\n', m);
        const std::string rec = c.out.substr(m + 9, eol == std::string::npos ? std::string::npos : eol - m - 9);
        o.ok = rec.compare(0, 2, "ok") == 0;
        const size_t tab = rec.find('\t');
        o.detail = tab == std::string::npos ? "" : rec.substr(tab + 1);
        o.output = c.out.substr(0, m);
        return o;
    }
    o.ok = false;
    const std::string tail = last_line(c.out.substr(0, m == std::string::npos ? c.out.size() : m));
    if (c.killed) o.detail = fmt("timed out after %d s (killed)", timeout);
    else if (WIFSIGNALED(status)) {
        const int sig = WTERMSIG(status);
        o.detail = fmt("crashed with signal %d (%s)%s", sig, strsignal(sig),
                       sig == SIGSEGV || sig == SIGBUS ? ": out-of-bounds access into a guard page, or a stack overflow" :
                       sig == SIGILL ? ": UBSan trap (misaligned access, bad index or overflow in kernel code)" : "");
    } else o.detail = fmt("exited with status %d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    if (!tail.empty()) o.detail += "; last output: " + tail;
    return o;
}

void run_forked(const std::vector<const TestCase*>& tests, const Options& opt, std::vector<Outcome>& results,
                const std::function<void(size_t)>& done) {
    std::vector<Child> running;
    size_t next = 0;
    while (next < tests.size() || !running.empty()) {
        while ((int)running.size() < opt.jobs && next < tests.size()) {
            int fds[2];
            if (pipe(fds) != 0) { perror("pipe"); exit(2); }
            fflush(stdout);
            fflush(stderr);
            const pid_t pid = fork();
            if (pid < 0) { perror("fork"); exit(2); }
            if (pid == 0) {
                close(fds[0]);
                dup2(fds[1], 1);
                dup2(fds[1], 2);
                close(fds[1]);
                Outcome o = run_here(*tests[next], opt.seed);
                std::string detail = o.detail;
                std::replace(detail.begin(), detail.end(), '\n', ' ');
                printf("%s@@RESULT %s\t%s\n", o.output.c_str(), o.ok ? "ok" : "fail", detail.c_str());
                fflush(stdout);
                _exit(0);
            }
            close(fds[1]);
            running.push_back({pid, fds[0], next, "", now_s()});
            ++next;
        }
        std::vector<pollfd> pfds;
        for (const Child& c : running) pfds.push_back({c.fd, POLLIN, 0});
        poll(pfds.data(), pfds.size(), 500);
        for (size_t i = 0; i < running.size();) {
            Child& c = running[i];
            bool eof = false;
            if (pfds[i].revents & (POLLIN | POLLHUP | POLLERR)) {
                char buf[4096];
                const ssize_t k = read(c.fd, buf, sizeof buf);
                if (k > 0) c.out.append(buf, (size_t)k);
                else eof = true;
            }
            if (!eof && !c.killed && now_s() - c.start > opt.timeout) {
                kill(c.pid, SIGKILL); // our own child, by pid
                c.killed = true;
            }
            if (eof) {
                int status = 0;
                waitpid(c.pid, &status, 0);
                close(c.fd);
                results[c.index] = finish_child(c, status, opt.timeout);
                const size_t idx = c.index;
                running.erase(running.begin() + (long)i);
                pfds.erase(pfds.begin() + (long)i);
                done(idx);
                continue;
            }
            ++i;
        }
    }
}

int usage(const char* argv0) {
    fprintf(stderr,
            "usage: %s [-j N] [--filter S]... [--list] [-v] [--seed N] [--timeout SECONDS] [--no-fork]\n"
            "  -j N         tests in parallel (forked processes; default 1)\n"
            "  --filter S   only tests whose name contains S (repeatable; any match)\n"
            "  --list       print the test names\n"
            "  -v           print the details of failing tests\n"
            "  --seed N     base seed for data and thread schedules (default 1)\n"
            "  --timeout S  per-test time limit (default 300)\n"
            "  --no-fork    run in this process (for a debugger; a crash stops everything)\n",
            argv0);
    return 2;
}

} // namespace

int main(int argc, char** argv) {
    Options opt;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) { usage(argv[0]); exit(2); }
            return argv[++i];
        };
        if (a == "-j") opt.jobs = std::max(1, std::atoi(value().c_str()));
        else if (a.rfind("-j", 0) == 0 && a.size() > 2) opt.jobs = std::max(1, std::atoi(a.c_str() + 2));
        else if (a == "--filter") opt.filters.push_back(value());
        else if (a == "--list") opt.list = true;
        else if (a == "-v") opt.verbose = true;
        else if (a == "--seed") opt.seed = std::strtoull(value().c_str(), nullptr, 10);
        else if (a == "--timeout") opt.timeout = std::max(1, std::atoi(value().c_str()));
        else if (a == "--no-fork") opt.fork = false;
        else return usage(argv[0]);
    }
    register_selftests();
    register_embedding();
    register_rmsnorm();
    register_qk_norm_rope();
    register_silu();
    register_kv_append();
    register_paged();
    register_prefill();
    register_sampling();
    register_all_reduce();
    register_reshard();

    std::set<std::string> names;
    std::vector<const TestCase*> tests;
    for (const TestCase& t : registry()) {
        if (!names.insert(t.name).second) {
            fprintf(stderr, "duplicate test name: %s\n", t.name.c_str());
            return 2;
        }
        bool match = opt.filters.empty();
        for (const std::string& f : opt.filters) match = match || t.name.find(f) != std::string::npos;
        if (match) tests.push_back(&t);
    }
    if (opt.list) {
        for (const TestCase* t : tests) printf("%s\n", t->name.c_str());
        return 0;
    }
    if (tests.empty()) {
        fprintf(stderr, "no test matches the filter\n");
        return 2;
    }

    const double t_start = now_s();
    std::vector<Outcome> results(tests.size());
    std::vector<bool> finished(tests.size(), false);
    size_t printed = 0;
    auto print_ready = [&](size_t idx) {
        finished[idx] = true;
        while (printed < tests.size() && finished[printed]) {
            const Outcome& o = results[printed];
            printf("%s %s  %s  [%.2fs]\n", o.ok ? "PASS" : "FAIL", tests[printed]->name.c_str(), o.detail.c_str(), o.secs);
            if (!o.ok && opt.verbose && !o.output.empty()) printf("%s%s", o.output.c_str(), o.output.back() == '\n' ? "" : "\n");
            fflush(stdout);
            ++printed;
        }
    };
    if (opt.fork) {
        run_forked(tests, opt, results, print_ready);
    } else {
        for (size_t i = 0; i < tests.size(); ++i) {
            results[i] = run_here(*tests[i], opt.seed);
            print_ready(i);
        }
    }

    std::map<std::string, std::pair<int, int>> fam; // family -> (passed, failed)
    std::vector<std::string> order;
    int passed = 0, failed = 0;
    for (size_t i = 0; i < tests.size(); ++i) {
        auto it = fam.find(tests[i]->family);
        if (it == fam.end()) { order.push_back(tests[i]->family); it = fam.emplace(tests[i]->family, std::make_pair(0, 0)).first; }
        (results[i].ok ? it->second.first : it->second.second)++;
        (results[i].ok ? passed : failed)++;
    }
    printf("\nsummary by family (%zu tests in %.1f s, -j %d):\n", tests.size(), now_s() - t_start, opt.fork ? opt.jobs : 1);
    for (const std::string& f : order)
        printf("  %-22s %3d passed, %d failed\n", f.c_str(), fam[f].first, fam[f].second);
    if (failed) {
        printf("failed tests (re-run one with: %s --filter '<name>' -v):\n", argv[0]);
        for (size_t i = 0; i < tests.size(); ++i)
            if (!results[i].ok) printf("  %s\n", tests[i]->name.c_str());
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
