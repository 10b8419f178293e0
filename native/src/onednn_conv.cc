// oneDNN convolutions as XLA FFI handlers: the forward convolution, its input gradient and
// its kernel gradient, for float32 channels-last images (N, *spatial, C) and kernels
// (*window, C, O), with 1-3 spatial dimensions.
//
// The geometry (strides, padding, kernel dilation) arrives as FFI attributes; the shapes
// come from the buffers. oneDNN primitives are built once per geometry and kept in a
// bounded cache. A call splits its images into chunks that run on XLA's intra-op thread
// pool, each chunk on one thread (OpenMP limited to one thread there), so oneDNN never
// starts threads of its own beside XLA's. Failures come back as ffi::Error, which JAX
// raises as a Python exception.

#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kernel : int64_t { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };
constexpr const char* kKernelNames[] = {"forward", "input_grad", "kernel_grad"};

// At most this many primitives are kept; the least recently used goes first.
constexpr size_t kCacheBound = 256;
// A chunk gets at least this many multiply-adds: below it, handing work to another thread
// costs more than it saves.
constexpr int64_t kMinChunkWork = int64_t{1} << 21;

// One convolution: N images of shape (*spatial, C), a (*window, C, O) kernel.
struct Geometry {
  int rank = 0;
  int64_t n = 0, c = 0, o = 0;
  dnnl::memory::dims spatial, window, out, strides, low, high, dilation;

  int64_t Work() const {  // multiply-adds of the forward convolution
    int64_t work = n * c * o;
    for (int d = 0; d < rank; ++d) work *= out[d] * window[d];
    return work;
  }
  int64_t ImageSize() const { return Product(spatial) * c; }
  int64_t OutImageSize() const { return Product(out) * o; }
  int64_t KernelSize() const { return Product(window) * c * o; }
  std::vector<int64_t> Key(Kernel kernel, int64_t images) const {
    std::vector<int64_t> key = {kernel, rank, images, c, o};
    for (const auto* dims : {&spatial, &window, &strides, &low, &high, &dilation})
      key.insert(key.end(), dims->begin(), dims->end());
    return key;
  }
  static int64_t Product(const dnnl::memory::dims& dims) {
    int64_t p = 1;
    for (int64_t d : dims) p *= d;
    return p;
  }
};

std::string Shape(ffi::Span<const int64_t> dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + ")";
}

// The geometry from the operands' shapes and the attributes, checked; an empty string
// means it is consistent.
std::string Describe(Kernel kernel, ffi::Span<const int64_t> a, ffi::Span<const int64_t> b,
                     ffi::Span<const int64_t> result, ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> low, ffi::Span<const int64_t> high,
                     ffi::Span<const int64_t> dilation, Geometry* g) {
  // forward(x, w) -> y; input_grad(dy, w) -> x; kernel_grad(x, dy) -> w.
  ffi::Span<const int64_t> x = kernel == kInputGrad ? result : a;
  ffi::Span<const int64_t> w = kernel == kKernelGrad ? result : b;
  ffi::Span<const int64_t> y = kernel == kForward ? result : (kernel == kInputGrad ? a : b);
  const int64_t rank = static_cast<int64_t>(x.size()) - 2;
  if (rank < 1 || rank > 3 || static_cast<int64_t>(w.size()) != rank + 2 ||
      static_cast<int64_t>(y.size()) != rank + 2 ||
      static_cast<int64_t>(strides.size()) != rank || static_cast<int64_t>(low.size()) != rank ||
      static_cast<int64_t>(high.size()) != rank ||
      static_cast<int64_t>(dilation.size()) != rank) {
    return "ranks disagree";
  }
  g->rank = static_cast<int>(rank);
  g->n = x[0];
  g->c = x[rank + 1];
  g->o = w[rank + 1];
  if (w[rank] != g->c) return "the kernel's input channels differ from the image's";
  for (int64_t d = 0; d < rank; ++d) {
    if (strides[d] < 1 || dilation[d] < 1 || low[d] < 0 || high[d] < 0)
      return "strides and dilation must be positive and padding non-negative";
    g->spatial.push_back(x[1 + d]);
    g->window.push_back(w[d]);
    g->strides.push_back(strides[d]);
    g->low.push_back(low[d]);
    g->high.push_back(high[d]);
    g->dilation.push_back(dilation[d] - 1);  // oneDNN counts the gaps
    const int64_t extent = (w[d] - 1) * dilation[d] + 1;
    const int64_t padded = x[1 + d] + low[d] + high[d];
    if (padded < extent) return "the window is larger than the padded image";
    g->out.push_back((padded - extent) / strides[d] + 1);
  }
  if (y[0] != g->n || y[rank + 1] != g->o) return "the images' or outputs' counts disagree";
  for (int64_t d = 0; d < rank; ++d)
    if (y[1 + d] != g->out[d]) return "the output's spatial shape is not the convolution's";
  for (int64_t v : x)
    if (v < 1) return "empty operands";
  for (int64_t v : w)
    if (v < 1) return "empty operands";
  return "";
}

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// Channels-last strides for logical (N, C, *spatial) dims.
dnnl::memory::desc ImagesDesc(int64_t n, int64_t c, const dnnl::memory::dims& spatial) {
  dnnl::memory::dims dims = {n, c}, strides = {Geometry::Product(spatial) * c, 1};
  dims.insert(dims.end(), spatial.begin(), spatial.end());
  for (size_t d = 0; d < spatial.size(); ++d) {
    int64_t inner = c;
    for (size_t e = d + 1; e < spatial.size(); ++e) inner *= spatial[e];
    strides.push_back(inner);
  }
  return dnnl::memory::desc(dims, dnnl::memory::data_type::f32, strides);
}

// The (*window, C, O) layout for logical (O, C, *window) dims.
dnnl::memory::desc KernelDesc(const Geometry& g) {
  dnnl::memory::dims dims = {g.o, g.c}, strides = {1, g.o};
  dims.insert(dims.end(), g.window.begin(), g.window.end());
  for (int d = 0; d < g.rank; ++d) {
    int64_t inner = g.c * g.o;
    for (int e = d + 1; e < g.rank; ++e) inner *= g.window[e];
    strides.push_back(inner);
  }
  return dnnl::memory::desc(dims, dnnl::memory::data_type::f32, strides);
}

// One kernel of one geometry at one batch size: the primitive and the reorder between
// the user's kernel layout and the one the primitive chose.
struct Entry {
  dnnl::primitive primitive;
  dnnl::memory::desc x, y, w, packed;
  dnnl::primitive reorder;  // w -> packed (forward, input_grad) or packed -> w
  bool needs_reorder = false;
  size_t scratch = 0;
  std::string implementation;
  uint64_t used = 0;
  // Kernel gradients as row GEMMs (see UseRows): `primitive` writes a tile's product,
  // `accumulate` adds it; a tile is `tile` rows of the grid (see RowGrid).
  bool rows = false;
  dnnl::primitive accumulate;
  dnnl::memory::desc a, b, c;
  int64_t tile = 0;
};

// The kernel gradient of a stride-1 convolution as matrix products, which oneDNN's GEMM
// runs about twice as fast as its direct kernel-gradient kernel (jit:avx2) on a CIFAR CNN's
// 3x3 layers. Number the positions (n, p) of a grid row by row: the zero-padded input's
// extents in the leading spatial dimensions, the output's in the last. The output gradient,
// zero-extended to the grid (rows outside the output are zero), is a matrix D of those rows
// by O channels. The window matrix X has a row per grid position too: the window's taps
// along the last dimension, p_last + k dil_last for k < window_last, of that line of the
// padded input, C channels each (im2col along the last dimension only). A tap k of the
// leading dimensions shifts X by a fixed number of rows, off_k = sum_d k_d dil_d
// stride_d(grid), and never across an image for a nonzero row of D, so
//   dW[k, :, :, :] = X[off_k:]^T D,  a (window_last C x rows) (rows x O) product
// that fills the kernel's (window_last, C, O) block of leading tap k. The rows go in tiles
// that stay in cache across the leading taps: each tile's D rows and the X rows it reaches
// are copied (padding and zero rows made on the way), then one GEMM per leading tap adds
// to dW. It costs the grid's extra rows (the padding of the leading dimensions), so it is
// used where they are few (at most twice the output's positions) and the channels fill a
// GEMM; a 1-D convolution has none.
struct RowGrid {
  dnnl::memory::dims grid, zeros, stride;  // the grid's extents and row strides
  std::vector<int64_t> offsets;            // the leading taps' row shifts, in kernel order
  int64_t reach = 0, rows = 0, width = 0;  // the largest shift; all rows; X's columns

  explicit RowGrid(const Geometry& g) : grid(g.rank), zeros(g.rank, 0), stride(g.rank) {
    const int last = g.rank - 1;
    for (int d = 0; d < g.rank; ++d)
      grid[d] = d == last ? g.out[d] : g.spatial[d] + g.low[d] + g.high[d];
    for (int d = g.rank; d-- > 0;) stride[d] = d < last ? stride[d + 1] * grid[d + 1] : 1;
    offsets = {0};
    for (int d = 0; d < last; ++d) {
      const int64_t step = (g.dilation[d] + 1) * stride[d];
      std::vector<int64_t> more;
      for (int64_t o : offsets)
        for (int64_t k = 0; k < g.window[d]; ++k) more.push_back(o + k * step);
      offsets.swap(more);
      reach += (g.window[d] - 1) * step;
    }
    rows = g.n * Geometry::Product(grid);
    width = g.window[last] * g.c;
  }
};

bool UseRows(const Geometry& g) {
  // JAX_SPECTRAL_ONEDNN_ROWS=0 keeps oneDNN's own kernel gradient (to compare the two).
  static const bool allowed = [] {
    const char* setting = std::getenv("JAX_SPECTRAL_ONEDNN_ROWS");
    return !(setting && std::string(setting) == "0");
  }();
  if (!allowed) return false;
  for (int d = 0; d < g.rank; ++d)
    if (g.strides[d] != 1) return false;
  return g.c >= 16 && g.o >= 16 && RowGrid(g).rows <= 2 * g.n * Geometry::Product(g.out);
}

int64_t RowTile(const Geometry& g) {  // about 1 MB of tile operands
  return std::max<int64_t>(256, (int64_t{1} << 18) / (RowGrid(g).width + g.o));
}

// The primitive of `pd`, its implementation's name, its scratchpad size and the kernel
// layout `packed` it chose.
template <typename PrimitiveT, typename DescT>
void Adopt(Entry* entry, const DescT& pd, const dnnl::memory::desc& packed) {
  entry->packed = packed;
  entry->primitive = PrimitiveT(pd);
  entry->implementation = pd.impl_info_str();
  entry->scratch = pd.scratchpad_desc().get_size();
}

// oneDNN fixes a primitive's thread count when it builds it (from omp_get_max_threads())
// and runs it on that many OpenMP threads whatever the caller's setting then: a primitive
// built for all cores and run on each of XLA's threads would start a team per thread.
// Built inside this guard with one thread, it runs on the calling thread alone.
class OmpThreads {
 public:
  explicit OmpThreads(int threads) : saved_(omp_get_max_threads()), set_(threads > 0) {
    if (set_) omp_set_num_threads(threads);
  }
  ~OmpThreads() {
    if (set_) omp_set_num_threads(saved_);
  }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  const int saved_;
  const bool set_;
};

// `threads`: the OpenMP threads the primitive will run on (0: oneDNN's default, all cores).
std::shared_ptr<Entry> Build(Kernel kernel, const Geometry& g, int64_t images, int threads) {
  OmpThreads scope(threads);
  auto entry = std::make_shared<Entry>();
  if (kernel == kKernelGrad && UseRows(g)) {
    auto& engine = Engine();
    const int64_t t = RowTile(g);
    entry->tile = t;
    const int64_t width = RowGrid(g).width;
    entry->a = dnnl::memory::desc({width, t}, dnnl::memory::data_type::f32, {1, width});
    entry->b = dnnl::memory::desc({t, g.o}, dnnl::memory::data_type::f32, {g.o, 1});
    entry->c = dnnl::memory::desc({width, g.o}, dnnl::memory::data_type::f32, {g.o, 1});
    dnnl::primitive_attr write, add;
    dnnl::post_ops sum;
    sum.append_sum(1.0f);
    add.set_post_ops(sum);
    for (auto* attr : {&write, &add}) attr->set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::matmul::primitive_desc first(engine, entry->a, entry->b, entry->c, write);
    dnnl::matmul::primitive_desc rest(engine, entry->a, entry->b, entry->c, add);
    const std::string name = rest.impl_info_str();
    if (name.rfind("ref", 0) != 0 && std::string(first.impl_info_str()).rfind("ref", 0) != 0) {
      entry->rows = true;
      entry->primitive = dnnl::matmul(first);
      entry->accumulate = dnnl::matmul(rest);
      entry->implementation = "rows+" + name;
      entry->scratch = std::max(first.scratchpad_desc().get_size(),
                                rest.scratchpad_desc().get_size());
      return entry;
    }  // oneDNN's reference loops for these GEMMs: its kernel gradient below instead
  }
  entry->x = ImagesDesc(images, g.c, g.spatial);
  entry->y = ImagesDesc(images, g.o, g.out);
  entry->w = KernelDesc(g);
  dnnl::memory::dims w_dims = entry->w.get_dims();
  dnnl::memory::desc any(w_dims, dnnl::memory::data_type::f32, dnnl::memory::format_tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& engine = Engine();
  dnnl::convolution_forward::primitive_desc forward(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, entry->x,
      any, entry->y, g.strides, g.dilation, g.low, g.high, attr);
  if (kernel == kForward) {
    Adopt<dnnl::convolution_forward>(entry.get(), forward, forward.weights_desc());
  } else if (kernel == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(
        engine, dnnl::algorithm::convolution_direct, entry->x, any, entry->y, g.strides,
        g.dilation, g.low, g.high, forward, attr);
    Adopt<dnnl::convolution_backward_data>(entry.get(), pd, pd.weights_desc());
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        engine, dnnl::algorithm::convolution_direct, entry->x, any, entry->y, g.strides,
        g.dilation, g.low, g.high, forward, attr);
    Adopt<dnnl::convolution_backward_weights>(entry.get(), pd, pd.diff_weights_desc());
  }
  entry->needs_reorder = !(entry->packed == entry->w);
  if (entry->needs_reorder) {
    dnnl::primitive_attr reorder_attr;
    reorder_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const bool to_packed = kernel != kKernelGrad;
    dnnl::reorder::primitive_desc pd(engine, to_packed ? entry->w : entry->packed, engine,
                                     to_packed ? entry->packed : entry->w, reorder_attr);
    entry->reorder = dnnl::reorder(pd);
    entry->scratch = std::max(entry->scratch, pd.scratchpad_desc().get_size());
  }
  return entry;
}

class Cache {
 public:
  std::shared_ptr<Entry> Get(Kernel kernel, const Geometry& g, int64_t images, int threads) {
    std::vector<int64_t> key = g.Key(kernel, images);
    key.push_back(threads);
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = entries_.find(key);
    if (found != entries_.end()) {
      found->second->used = ++clock_;
      return found->second;
    }
    if (entries_.size() >= kCacheBound) {
      auto oldest = std::min_element(entries_.begin(), entries_.end(), [](auto& a, auto& b) {
        return a.second->used < b.second->used;
      });
      entries_.erase(oldest);  // a call still running keeps its own reference
    }
    auto entry = Build(kernel, g, images, threads);
    entry->used = ++clock_;
    entries_.emplace(std::move(key), entry);
    return entry;
  }
  size_t Size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }
  // Held across fork(), so that a child never inherits it locked by a thread it lacks.
  void Lock() { mutex_.lock(); }
  void Unlock() { mutex_.unlock(); }

 private:
  std::mutex mutex_;
  std::map<std::vector<int64_t>, std::shared_ptr<Entry>> entries_;
  uint64_t clock_ = 0;
};

Cache& Primitives() {
  static Cache* cache = [] {
    auto* made = new Cache();  // never destroyed: no teardown order at exit
    pthread_atfork([] { Primitives().Lock(); }, [] { Primitives().Unlock(); },
                   [] { Primitives().Unlock(); });
    return made;
  }();
  return *cache;
}

struct Aligned {
  explicit Aligned(size_t bytes)
      : data(bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr) {
    if (bytes && !data) throw std::bad_alloc();
  }
  ~Aligned() { std::free(data); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  void* data;
};

// One chunk of images: a, b and out already point at the chunk's part.
void RunChunk(Kernel kernel, const Entry& e, float* a, float* b, float* out) {
  using Args = std::unordered_map<int, dnnl::memory>;
  auto& engine = Engine();
  thread_local dnnl::stream stream(engine);  // one per thread: streams are not shared
  Aligned packed(e.needs_reorder ? e.packed.get_size() : 0), scratch(e.scratch);
  auto with_scratch = [&](Args args) {
    if (e.scratch) {
      dnnl::memory::desc bytes({static_cast<int64_t>(e.scratch)}, dnnl::memory::data_type::u8,
                               dnnl::memory::format_tag::x);
      args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(bytes, engine, scratch.data));
    }
    return args;
  };
  dnnl::memory w(e.w, engine, kernel == kKernelGrad ? out : b);
  dnnl::memory w_packed = e.needs_reorder ? dnnl::memory(e.packed, engine, packed.data) : w;
  if (e.needs_reorder && kernel != kKernelGrad)
    e.reorder.execute(stream, with_scratch({{DNNL_ARG_FROM, w}, {DNNL_ARG_TO, w_packed}}));
  if (kernel == kForward) {
    e.primitive.execute(stream, with_scratch({{DNNL_ARG_SRC, dnnl::memory(e.x, engine, a)},
                                              {DNNL_ARG_WEIGHTS, w_packed},
                                              {DNNL_ARG_DST, dnnl::memory(e.y, engine, out)}}));
  } else if (kernel == kInputGrad) {
    e.primitive.execute(stream,
                        with_scratch({{DNNL_ARG_DIFF_DST, dnnl::memory(e.y, engine, a)},
                                      {DNNL_ARG_WEIGHTS, w_packed},
                                      {DNNL_ARG_DIFF_SRC, dnnl::memory(e.x, engine, out)}}));
  } else {
    e.primitive.execute(stream, with_scratch({{DNNL_ARG_SRC, dnnl::memory(e.x, engine, a)},
                                              {DNNL_ARG_DIFF_DST, dnnl::memory(e.y, engine, b)},
                                              {DNNL_ARG_DIFF_WEIGHTS, w_packed}}));
    if (e.needs_reorder)
      e.reorder.execute(stream, with_scratch({{DNNL_ARG_FROM, w_packed}, {DNNL_ARG_TO, w}}));
  }
  stream.wait();
}

// Grid row `row`'s image, and its position in `p`, for a grid with extents `grid`.
int64_t GridPosition(int64_t row, const dnnl::memory::dims& grid, std::vector<int64_t>& p) {
  const int64_t positions = Geometry::Product(grid);
  int64_t rem = row % positions;
  for (size_t d = grid.size(); d-- > 0;) {
    p[d] = rem % grid[d];
    rem /= grid[d];
  }
  return row / positions;
}

// Whether position p's leading coordinates (all but the last), less `lo`, lie inside
// `extent`; if so `line` is the number of that line of the source image.
bool SourceLine(const std::vector<int64_t>& p, const dnnl::memory::dims& lo,
                const dnnl::memory::dims& extent, int64_t* line) {
  *line = 0;
  for (size_t d = 0; d + 1 < p.size(); ++d) {
    const int64_t q = p[d] - lo[d];
    if (q < 0 || q >= extent[d]) return false;
    *line = *line * extent[d] + q;
  }
  return true;
}

// Copies rows [begin, end) of a position matrix into `to`: row r is position (n, p) of
// a grid with extents `grid`; the source holds (n, *extent, ch) channels last at
// positions p - lo; rows outside it, or past `total`, are zeros. Runs along the last
// spatial dimension go in one copy.
void CopyRows(float* to, const float* from, int64_t begin, int64_t end, int64_t total,
              const dnnl::memory::dims& grid, const dnnl::memory::dims& lo,
              const dnnl::memory::dims& extent, int64_t ch) {
  const size_t rank = grid.size(), last = rank - 1;
  const int64_t image = Geometry::Product(extent) * ch;
  std::vector<int64_t> p(rank);
  int64_t n = GridPosition(begin, grid, p), offset;
  int64_t r = begin;
  const int64_t stop = std::min(end, total);
  while (r < stop) {
    const bool inside = SourceLine(p, lo, extent, &offset);
    const int64_t q = p[last] - lo[last];
    int64_t run;  // rows to the next change along the last dimension
    if (inside && q >= 0 && q < extent[last]) {
      run = std::min(extent[last] - q, stop - r);
      const float* source = from + n * image + (offset * extent[last] + q) * ch;
      std::memcpy(to, source, run * ch * sizeof(float));
    } else {
      run = std::min((inside && q < 0 ? lo[last] : grid[last]) - p[last], stop - r);
      std::memset(to, 0, run * ch * sizeof(float));
    }
    to += run * ch;
    r += run;
    p[last] += run;
    for (size_t d = rank; d-- > 0 && p[d] >= grid[d];) {  // carry into the next position
      p[d] = 0;
      if (d == 0) {
        ++n;
      } else {
        ++p[d - 1];
      }
    }
  }
  if (end > r) std::memset(to, 0, (end - r) * ch * sizeof(float));
}

// Copies rows [begin, end) of the window matrix X (see RowGrid) into `to`: row r is grid
// position (n, p) and holds positions p_last + k step (k < taps) of line p of the padded
// input, `ch` channels each; the source holds (n, *extent, ch) channels last at positions
// p - lo; positions outside it, and rows past `total`, are zeros.
void CopyWindows(float* to, const float* from, int64_t begin, int64_t end, int64_t total,
                 const dnnl::memory::dims& grid, const dnnl::memory::dims& lo,
                 const dnnl::memory::dims& extent, int64_t ch, int64_t taps, int64_t step) {
  const size_t rank = grid.size(), last = rank - 1;
  const int64_t image = Geometry::Product(extent) * ch, width = taps * ch;
  std::vector<int64_t> p(rank);
  int64_t n = GridPosition(begin, grid, p), offset;
  const int64_t stop = std::min(end, total);
  for (int64_t r = begin; r < stop; ++r, to += width) {
    if (!SourceLine(p, lo, extent, &offset)) {
      std::memset(to, 0, width * sizeof(float));
    } else {
      const float* line = from + n * image + offset * extent[last] * ch;
      const int64_t first = p[last] - lo[last];  // the line's position of tap 0
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t q = first + k * step;
        if (q >= 0 && q < extent[last]) {
          std::memcpy(to + k * ch, line + q * ch, ch * sizeof(float));
        } else {
          std::memset(to + k * ch, 0, ch * sizeof(float));
        }
      }
    }
    for (size_t d = rank; d-- > 0 && ++p[d] >= grid[d];) {  // the next position
      p[d] = 0;
      if (d == 0) ++n;
    }
  }
  if (end > stop) std::memset(to, 0, (end - stop) * width * sizeof(float));
}

// A kernel gradient by row GEMMs (see RowGrid): takes tiles from `next` until all `tiles`
// are taken and sums their products into `out`, laid out (*window, C, O). Returns
// whether it took any (then `out` is written, otherwise untouched).
bool RunRows(const Entry& e, const Geometry& g, const RowGrid& rg, std::atomic<int64_t>& next,
             int64_t tiles, const float* x, const float* dy, float* out) {
  using Args = std::unordered_map<int, dnnl::memory>;
  auto& engine = Engine();
  thread_local dnnl::stream stream(engine);
  const int last = g.rank - 1;
  const int64_t t = e.tile;
  thread_local std::vector<float> xs, ds;
  xs.resize((t + rg.reach) * rg.width);
  ds.resize(t * g.o);
  Aligned scratch(e.scratch);  // user-managed: threads never share oneDNN's
  dnnl::memory::desc scratch_bytes({static_cast<int64_t>(e.scratch)},
                                   dnnl::memory::data_type::u8, dnnl::memory::format_tag::x);
  bool wrote = false;
  for (int64_t tile = next.fetch_add(1); tile < tiles; tile = next.fetch_add(1)) {
    const int64_t begin = tile * t;
    CopyRows(ds.data(), dy, begin, begin + t, rg.rows, rg.grid, rg.zeros, g.out, g.o);
    CopyWindows(xs.data(), x, begin, begin + t + rg.reach, rg.rows, rg.grid, g.low, g.spatial,
                g.c, g.window[last], g.dilation[last] + 1);
    const dnnl::primitive& gemm = wrote ? e.accumulate : e.primitive;
    dnnl::memory b(e.b, engine, ds.data());
    for (size_t k = 0; k < rg.offsets.size(); ++k) {
      dnnl::memory a(e.a, engine, xs.data() + rg.offsets[k] * rg.width);
      dnnl::memory c(e.c, engine, out + k * rg.width * g.o);
      Args args{{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}};
      if (e.scratch)
        args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(scratch_bytes, engine, scratch.data));
      gemm.execute(stream, args);
    }
    wrote = true;
  }
  stream.wait();
  return wrote;
}

// JAX_SPECTRAL_ONEDNN_THREADS=openmp: each call runs whole on oneDNN's own OpenMP threads.
bool UseOpenmp() {
  static const bool use_openmp = [] {
    const char* setting = std::getenv("JAX_SPECTRAL_ONEDNN_THREADS");
    return setting && std::string(setting) == "openmp";
  }();
  return use_openmp;
}

// Chunks handed out to whichever thread asks next: the calling thread works through them
// too, and waits only for chunks another thread has already started, so a task still
// queued behind a busy pool never holds the call up (and cannot deadlock it).
struct Job {
  explicit Job(int64_t count, std::function<void(int64_t)> run)
      : chunks(count), work(std::move(run)) {}

  void Drain(bool single_threaded) {
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= chunks) return;
      std::string failure;
      {
        OmpThreads scope(single_threaded ? 1 : 0);
        try {
          work(i);
        } catch (const dnnl::error& e) {
          failure =
              std::string("oneDNN: ") + e.what() + " (status " + std::to_string(e.status) + ")";
        } catch (const std::exception& e) {
          failure = e.what();
        } catch (...) {
          failure = "unknown exception";
        }
      }
      std::lock_guard<std::mutex> lock(mutex);
      if (!failure.empty() && error.empty()) error = failure;
      if (++finished == chunks) done.notify_all();
    }
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [this] { return finished == chunks; });
  }

  const int64_t chunks;
  std::function<void(int64_t)> work;
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::condition_variable done;
  int64_t finished = 0;
  std::string error;
};

// Runs `fn`; an exception it throws comes back as an ffi::Error prefixed with `name`.
template <typename Fn>
ffi::Error Guarded(const std::string& name, Fn&& fn) {
  try {
    fn();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(name + "oneDNN: " + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(name + e.what());
  }
  return ffi::Error::Success();
}

// A kernel gradient by row GEMMs (see RowGrid). Each of XLA's threads (or, when `threads`
// is 0, the calling one on oneDNN's own threads) sums the tiles it takes into its own
// output; a thread that starts late takes fewer, so none waits on a busy one.
ffi::Error ConvolveRows(const std::string& name, ffi::ThreadPool pool, int64_t threads,
                        const Geometry& g, const Entry& entry, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> result) {
  const bool pooled = threads > 0;
  const RowGrid rg(g);
  std::vector<std::unique_ptr<Aligned>> partials;  // one sum per worker after the first
  const int64_t tiles = (rg.rows + entry.tile - 1) / entry.tile;
  const int64_t workers = std::min<int64_t>({tiles, std::max<int64_t>(threads, 1),
                                             std::max<int64_t>(g.Work() / kMinChunkWork, 1)});
  ffi::Error made = Guarded(name, [&] {
    for (int64_t i = 1; i < workers; ++i)
      partials.push_back(std::make_unique<Aligned>(g.KernelSize() * sizeof(float)));
  });
  if (made.failure()) return made;
  const float* px = x.typed_data();
  const float* pdy = dy.typed_data();
  float* pout = result->typed_data();
  std::atomic<int64_t> next{0};
  std::vector<char> wrote(workers, 0);
  auto job = std::make_shared<Job>(workers, [&](int64_t i) {
    float* out = i == 0 ? pout : static_cast<float*>(partials[i - 1]->data);
    wrote[i] = RunRows(entry, g, rg, next, tiles, px, pdy, out);
  });
  for (int64_t i = 1; i < workers; ++i) pool.Schedule([job] { job->Drain(true); });
  job->Drain(pooled);
  job->Wait();
  if (!job->error.empty()) return ffi::Error::Internal(name + job->error);
  if (!wrote[0]) std::memset(pout, 0, g.KernelSize() * sizeof(float));
  for (int64_t i = 1; i < workers; ++i) {
    if (!wrote[i]) continue;
    const float* p = static_cast<const float*>(partials[i - 1]->data);
    for (int64_t k = 0; k < g.KernelSize(); ++k) pout[k] += p[k];
  }
  return ffi::Error::Success();
}

ffi::Error Convolve(Kernel kernel, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                    ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> result,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> low,
                    ffi::Span<const int64_t> high, ffi::Span<const int64_t> dilation) {
  const std::string name = std::string("jax_spectral oneDNN ") + kKernelNames[kernel] + ": ";
  Geometry g;
  const std::string problem = Describe(kernel, a.dimensions(), b.dimensions(),
                                       result->dimensions(), strides, low, high, dilation, &g);
  if (!problem.empty()) {
    return ffi::Error::InvalidArgument(name + problem + ": operands " + Shape(a.dimensions()) +
                                       " and " + Shape(b.dimensions()) + ", result " +
                                       Shape(result->dimensions()));
  }
  const int64_t threads = UseOpenmp() ? 0 : pool.num_threads();
  const bool pooled = threads > 0;  // without XLA's pool, oneDNN's own threads do the work
  if (kernel == kKernelGrad && UseRows(g)) {
    std::shared_ptr<Entry> entry;
    ffi::Error got =
        Guarded(name, [&] { entry = Primitives().Get(kKernelGrad, g, g.n, pooled ? 1 : 0); });
    if (got.failure()) return got;
    if (entry->rows) return ConvolveRows(name, pool, threads, g, *entry, a, b, result);
  }
  int64_t chunks = std::min<int64_t>({g.n, std::max<int64_t>(threads, 1),
                                      std::max<int64_t>(g.Work() / kMinChunkWork, 1)});
  const int64_t base = g.n / chunks, extra = g.n % chunks;  // `extra` chunks get one more
  std::shared_ptr<Entry> small, large;
  std::vector<std::unique_ptr<Aligned>> partials;  // kernel_grad: one sum per extra chunk
  ffi::Error made = Guarded(name, [&] {
    small = Primitives().Get(kernel, g, base, pooled ? 1 : 0);
    large = extra ? Primitives().Get(kernel, g, base + 1, pooled ? 1 : 0) : small;
    if (kernel == kKernelGrad) {
      for (int64_t i = 1; i < chunks; ++i)
        partials.push_back(std::make_unique<Aligned>(g.KernelSize() * sizeof(float)));
    }
  });
  if (made.failure()) return made;
  float* pa = a.typed_data();
  float* pb = b.typed_data();
  float* pout = result->typed_data();
  const int64_t in_image = kernel == kInputGrad ? g.OutImageSize() : g.ImageSize();
  const int64_t other_image = kernel == kKernelGrad ? g.OutImageSize() : 0;
  const int64_t out_image = kernel == kForward ? g.OutImageSize() : g.ImageSize();
  auto job = std::make_shared<Job>(chunks, [&](int64_t i) {
    const int64_t start = i * base + std::min(i, extra);
    const Entry& e = i < extra ? *large : *small;
    float* chunk_b = kernel == kKernelGrad ? pb + start * other_image : pb;
    float* chunk_out = kernel == kKernelGrad
                           ? (i == 0 ? pout : static_cast<float*>(partials[i - 1]->data))
                           : pout + start * out_image;
    RunChunk(kernel, e, pa + start * in_image, chunk_b, chunk_out);
  });
  for (int64_t i = 1; i < chunks; ++i) pool.Schedule([job] { job->Drain(true); });
  job->Drain(pooled);
  job->Wait();
  if (!job->error.empty()) return ffi::Error::Internal(name + job->error);
  for (auto& partial : partials) {
    const float* p = static_cast<const float*>(partial->data);
    for (int64_t k = 0; k < g.KernelSize(); ++k) pout[k] += p[k];
  }
  return ffi::Error::Success();
}

template <Kernel kKernel>
ffi::Error Handler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> result, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> low, ffi::Span<const int64_t> high,
                   ffi::Span<const int64_t> dilation) {
  return Convolve(kKernel, pool, a, b, result, strides, low, high, dilation);
}

}  // namespace

#define JAX_SPECTRAL_BIND                     \
  ffi::Ffi::Bind()                            \
      .Ctx<ffi::ThreadPool>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()           \
      .Arg<ffi::Buffer<ffi::F32>>()           \
      .Ret<ffi::Buffer<ffi::F32>>()           \
      .Attr<ffi::Span<const int64_t>>("strides") \
      .Attr<ffi::Span<const int64_t>>("low")  \
      .Attr<ffi::Span<const int64_t>>("high") \
      .Attr<ffi::Span<const int64_t>>("dilation")

// Built with hidden visibility: only these symbols are exported.
#define JAX_SPECTRAL_EXPORT extern "C" __attribute__((visibility("default")))
JAX_SPECTRAL_EXPORT XLA_FFI_Error* JaxSpectralOnednnForward(XLA_FFI_CallFrame*);
JAX_SPECTRAL_EXPORT XLA_FFI_Error* JaxSpectralOnednnInputGrad(XLA_FFI_CallFrame*);
JAX_SPECTRAL_EXPORT XLA_FFI_Error* JaxSpectralOnednnKernelGrad(XLA_FFI_CallFrame*);
JAX_SPECTRAL_EXPORT int JaxSpectralOnednnCheck(int, const int64_t*, const int64_t*,
                                               const int64_t*, const int64_t*, const int64_t*,
                                               const int64_t*, const int64_t*, char*, size_t);
JAX_SPECTRAL_EXPORT void JaxSpectralOnednnVersion(char*, size_t);
JAX_SPECTRAL_EXPORT size_t JaxSpectralOnednnCached();
JAX_SPECTRAL_EXPORT size_t JaxSpectralOnednnCacheBound();

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpectralOnednnForward, Handler<kForward>, JAX_SPECTRAL_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpectralOnednnInputGrad, Handler<kInputGrad>,
                              JAX_SPECTRAL_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpectralOnednnKernelGrad, Handler<kKernelGrad>,
                              JAX_SPECTRAL_BIND);

extern "C" {

// Whether all three kernels of this geometry have oneDNN JIT implementations (1), not only
// its reference loops (0), or the geometry is invalid (-1). `message` receives the
// implementations' names or the reason.
int JaxSpectralOnednnCheck(int rank, const int64_t* x_shape, const int64_t* w_shape,
                           const int64_t* y_shape, const int64_t* strides, const int64_t* low,
                           const int64_t* high, const int64_t* dilation, char* message,
                           size_t length) {
  auto span = [rank](const int64_t* p, int extra) {
    return ffi::Span<const int64_t>(p, static_cast<size_t>(rank + extra));
  };
  std::string text;
  int status = 1;
  Geometry g;
  text = Describe(kForward, span(x_shape, 2), span(w_shape, 2), span(y_shape, 2),
                  span(strides, 0), span(low, 0), span(high, 0), span(dilation, 0), &g);
  if (!text.empty()) {
    status = -1;
  } else {
    try {
      for (Kernel kernel : {kForward, kInputGrad, kKernelGrad}) {
        auto entry = Primitives().Get(kernel, g, g.n, UseOpenmp() ? 0 : 1);
        text += std::string(text.empty() ? "" : "; ") + kKernelNames[kernel] + ": " +
                entry->implementation;
        if (entry->implementation.rfind("ref", 0) == 0) status = 0;
      }
    } catch (const dnnl::error& e) {
      text = std::string("oneDNN: ") + e.what();
      status = -1;
    }
  }
  if (length) {
    std::strncpy(message, text.c_str(), length - 1);
    message[length - 1] = '\0';
  }
  return status;
}

// The linked oneDNN's version, as "major.minor.patch".
void JaxSpectralOnednnVersion(char* text, size_t length) {
  const dnnl_version_t* v = dnnl_version();
  std::string s = std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
                  std::to_string(v->patch);
  std::strncpy(text, s.c_str(), length - 1);
  text[length - 1] = '\0';
}

// Primitives now cached, and the bound.
size_t JaxSpectralOnednnCached() { return Primitives().Size(); }
size_t JaxSpectralOnednnCacheBound() { return kCacheBound; }

}  // extern "C"
