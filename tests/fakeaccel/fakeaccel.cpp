// A fake accelerator on the CPU, for tests: torch's PrivateUse1 backend, registered under the name the
// Python side gives it (tests/fakeaccel/__init__.py). Device memory is host memory from its own allocator
// (a settable capacity per device, statistics for torch.accelerator's memory functions); pinned host
// memory is tracked so that `is_pinned()` is true only for what came from its pinned allocator; streams
// and events follow torch's device-generic interface; every op without a kernel here runs on the CPU
// kernels, on the same bytes, after checking that its tensors share one device.
//
// Two modes. "sync": everything runs when issued and every event is complete. "deferred": a copy into
// device memory is queued on its stream and runs only when something orders it: a wait on an event
// recorded after it, other work on the same stream, or a synchronize; a pinned source is read when the
// copy runs, not when it is issued; new device memory is filled with 0xFF bytes (NaN in every float
// dtype). Compute always runs when issued, on the calling thread. So a missing `wait_event`, a pinned
// buffer rewritten before its copy was waited for, or a slot read before its copy, gives wrong numbers
// here where the synchronous CPU path is right by luck.
//
// Counters (`torch.ops.fakeaccel.counters()`): copies issued with non_blocking=True from pageable host
// memory (a real device makes those synchronous: the overlap they were written for is lost), copies
// queued, and copies run by a flush.
//
// The interfaces used (DeviceGuardImplInterface, PrivateUse1HooksInterface, DeviceAllocator, the boxed
// fallback) are ATen internals that change between torch releases: built and tested with the torch that
// requirements-dev.txt pins.

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/Resize.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace fakeaccel {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

constexpr DeviceIndex kDevices = 2;
constexpr DeviceType kType = DeviceType::PrivateUse1;
constexpr size_t kRound = 512;  // what CUDA's caching allocator rounds a block up to

std::recursive_mutex mu;  // every piece of shared state below
std::atomic<bool> deferred{false};
std::atomic<int64_t> pageable_async{0}, queued{0}, ran{0}, flushes{0};

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------------------------------
// current device and streams (per thread, as on CUDA)

thread_local DeviceIndex tl_device = 0;
thread_local std::array<c10::StreamId, kDevices> tl_stream{};  // 0: the default stream
std::atomic<c10::StreamId> next_stream{1};

DeviceIndex index_of(Device d) {
  const DeviceIndex i = d.has_index() ? d.index() : tl_device;
  TORCH_CHECK(i >= 0 && i < kDevices, "fake accelerator: device index ", int(i), " out of range (", int(kDevices),
              " devices)");
  return i;
}

// ---------------------------------------------------------------------------------------------------
// stream queues (deferred mode): items run in order, each stream on its own

struct EventState {  // one record of an event
  bool done = false;
  double ms = 0;
  DeviceIndex device = 0;
  c10::StreamId stream = 0;
  uint64_t seq = 0;  // the stream's item this record waits behind
};

struct Item {
  uint64_t seq;
  std::function<void()> run;  // a copy; empty for an event's marker
  std::shared_ptr<EventState> event;
};

struct Queue {
  std::deque<Item> items;
  uint64_t next = 1;  // seq of the next item
};

std::map<std::pair<DeviceIndex, c10::StreamId>, Queue> queues;

Queue& queue(DeviceIndex d, c10::StreamId s) { return queues[{d, s}]; }

// Run the items of stream (d, s) up to and including seq `upto`. The items run are handed to `ran_items`,
// to be destroyed only once `mu` is let go: the tensors they hold may be a Python object's, whose
// destruction takes the GIL, and a thread holding the GIL may be waiting for `mu`.
void flush_locked(DeviceIndex d, c10::StreamId s, uint64_t upto, std::vector<Item>& ran_items) {
  auto it = queues.find({d, s});
  if (it == queues.end()) return;
  auto& items = it->second.items;
  bool any = false;
  c10::InferenceMode inference;  // host aliases made under inference mode are inference tensors
  while (!items.empty() && items.front().seq <= upto) {
    ran_items.push_back(std::move(items.front()));
    items.pop_front();
    Item& item = ran_items.back();
    if (item.run) {
      item.run();
      ++ran;
      any = true;
    }
    if (item.event) {
      item.event->done = true;
      item.event->ms = now_ms();
    }
  }
  if (any) ++flushes;
}

void flush(DeviceIndex d, c10::StreamId s, uint64_t upto = UINT64_MAX) {
  std::vector<Item> ran_items;  // destroyed after the lock is let go
  std::lock_guard<std::recursive_mutex> g(mu);
  flush_locked(d, s, upto, ran_items);
}

void flush_device(DeviceIndex d) {
  std::vector<Item> ran_items;
  std::lock_guard<std::recursive_mutex> g(mu);
  for (auto& [key, q] : queues)
    if (key.first == d) flush_locked(d, key.second, UINT64_MAX, ran_items);
}

void flush_all() {
  std::vector<Item> ran_items;
  std::lock_guard<std::recursive_mutex> g(mu);
  for (auto& [key, q] : queues) flush_locked(key.first, key.second, UINT64_MAX, ran_items);
}

void flush_current(DeviceIndex d) { flush(d, tl_stream[d]); }

// Queue `run` on the current stream of device d (deferred mode), or run it now.
void issue(DeviceIndex d, std::function<void()> run) {
  if (!deferred) {
    run();
    return;
  }
  std::lock_guard<std::recursive_mutex> g(mu);
  auto& q = queue(d, tl_stream[d]);
  q.items.push_back(Item{q.next++, std::move(run), nullptr});
  ++queued;
}

// ---------------------------------------------------------------------------------------------------
// device memory

struct DeviceMemory final : c10::DeviceAllocator {
  std::array<size_t, kDevices> capacity{};
  std::array<c10::CachingDeviceAllocator::DeviceStats, kDevices> stats{};
  std::unordered_map<void*, std::pair<DeviceIndex, size_t>> blocks;

  DeviceMemory() { capacity.fill(size_t(16) << 30); }

  static void release(void* p);

  c10::DataPtr allocate(size_t n) override {
    const DeviceIndex d = tl_device;
    const size_t rounded = (n + kRound - 1) / kRound * kRound;
    {
      std::lock_guard<std::recursive_mutex> g(mu);
      const size_t used = stats[d].allocated_bytes[0].current;
      TORCH_CHECK_WITH(OutOfMemoryError, used + rounded <= capacity[d], "fake accelerator: out of memory: tried to ",
                       "allocate ", n, " bytes on device ", int(d), " with ", used, " of ", capacity[d],
                       " bytes in use");
    }
    void* p = nullptr;
    if (n > 0) {
      p = std::aligned_alloc(64, (rounded + 63) / 64 * 64);
      TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "fake accelerator: host allocation of ", n, " bytes failed");
      if (deferred) std::memset(p, 0xFF, rounded);  // NaN in every float dtype: a read before a write shows
      std::lock_guard<std::recursive_mutex> g(mu);
      blocks[p] = {d, rounded};
      auto& s = stats[d];
      s.allocated_bytes[0].increase(rounded);
      s.reserved_bytes[0].increase(rounded);
      s.active_bytes[0].increase(rounded);
      s.requested_bytes[0].increase(n);
      s.allocation[0].increase(1);
    }
    return {p, p, &DeviceMemory::release, Device(kType, d)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &DeviceMemory::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    flush_all();
    std::memcpy(dest, src, count);
  }

  bool initialized() override { return true; }
  void emptyCache(c10::MempoolId_t) override {}
  void recordStream(const c10::DataPtr&, c10::Stream) override {}

  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(DeviceIndex d) override {
    std::lock_guard<std::recursive_mutex> g(mu);
    return stats.at(d);
  }
  void resetAccumulatedStats(DeviceIndex d) override {
    std::lock_guard<std::recursive_mutex> g(mu);
    for (auto* a : {&stats[d].allocated_bytes, &stats[d].reserved_bytes, &stats[d].active_bytes,
                    &stats[d].requested_bytes, &stats[d].allocation})
      (*a)[0].reset_accumulated();
  }
  void resetPeakStats(DeviceIndex d) override {
    std::lock_guard<std::recursive_mutex> g(mu);
    for (auto* a : {&stats[d].allocated_bytes, &stats[d].reserved_bytes, &stats[d].active_bytes,
                    &stats[d].requested_bytes, &stats[d].allocation})
      (*a)[0].reset_peak();
  }
  std::pair<size_t, size_t> getMemoryInfo(DeviceIndex d) override {
    std::lock_guard<std::recursive_mutex> g(mu);
    return {capacity.at(d) - stats.at(d).reserved_bytes[0].current, capacity.at(d)};
  }
};

DeviceMemory device_memory;

void DeviceMemory::release(void* p) {
  if (p == nullptr) return;
  {
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = device_memory.blocks.find(p);
    if (it != device_memory.blocks.end()) {
      auto [d, n] = it->second;
      auto& s = device_memory.stats[d];
      s.allocated_bytes[0].decrease(n);
      s.reserved_bytes[0].decrease(n);
      s.active_bytes[0].decrease(n);
      s.allocation[0].decrease(1);
      device_memory.blocks.erase(it);
    }
  }
  std::free(p);
}

// ---------------------------------------------------------------------------------------------------
// pinned host memory: ordinary host memory whose ranges are known, so `is_pinned()` can tell

std::map<uintptr_t, size_t> pinned_ranges;

struct PinnedMemory final : c10::Allocator {
  static void release(void* p) {
    if (p == nullptr) return;
    {
      std::lock_guard<std::recursive_mutex> g(mu);
      pinned_ranges.erase(reinterpret_cast<uintptr_t>(p));
    }
    std::free(p);
  }
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n > 0) {
      p = std::aligned_alloc(64, (n + 63) / 64 * 64);
      TORCH_CHECK(p != nullptr, "fake accelerator: pinned allocation of ", n, " bytes failed");
      std::lock_guard<std::recursive_mutex> g(mu);
      pinned_ranges[reinterpret_cast<uintptr_t>(p)] = n;
    }
    return {p, p, &PinnedMemory::release, Device(DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &PinnedMemory::release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

PinnedMemory pinned_memory;

bool is_pinned_ptr(const void* data) {
  std::lock_guard<std::recursive_mutex> g(mu);
  const auto p = reinterpret_cast<uintptr_t>(data);
  auto it = pinned_ranges.upper_bound(p);
  if (it == pinned_ranges.begin()) return false;
  --it;
  return p >= it->first && p < it->first + std::max<size_t>(it->second, 1);
}

// ---------------------------------------------------------------------------------------------------
// the device guard: devices, streams, events

struct Guard final : c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return kType; }
  Device exchangeDevice(Device d) const override {
    Device old = getDevice();
    setDevice(d);
    return old;
  }
  Device getDevice() const override { return Device(kType, tl_device); }
  void setDevice(Device d) const override { tl_device = index_of(d); }
  void uncheckedSetDevice(Device d) const noexcept override {
    if (d.has_index() && d.index() >= 0 && d.index() < kDevices) tl_device = d.index();
  }
  Stream getStream(Device d) const override {
    const auto i = index_of(d);
    return Stream(Stream::UNSAFE, Device(kType, i), tl_stream[i]);
  }
  Stream getDefaultStream(Device d) const override { return Stream(Stream::UNSAFE, Device(kType, index_of(d)), 0); }
  Stream getStreamFromGlobalPool(Device d, bool) const override { return getNewStream(d, 0); }
  Stream getNewStream(Device d, int) const override {
    return Stream(Stream::UNSAFE, Device(kType, index_of(d)), next_stream++);
  }
  Stream exchangeStream(Stream s) const override {
    const auto i = index_of(s.device());
    Stream old(Stream::UNSAFE, Device(kType, i), tl_stream[i]);
    tl_stream[i] = s.id();
    return old;
  }
  DeviceIndex deviceCount() const noexcept override { return kDevices; }

  // an event is a pointer to a shared_ptr<EventState>: its latest record
  void destroyEvent(void* e, const DeviceIndex) const noexcept override {
    std::lock_guard<std::recursive_mutex> g(mu);
    delete static_cast<std::shared_ptr<EventState>*>(e);
  }
  void record(void** e, const Stream& s, const DeviceIndex, const c10::EventFlag) const override {
    std::lock_guard<std::recursive_mutex> g(mu);
    if (*e == nullptr) *e = new std::shared_ptr<EventState>();
    auto& slot = *static_cast<std::shared_ptr<EventState>*>(*e);
    auto state = std::make_shared<EventState>();
    state->device = s.device_index();
    state->stream = s.id();
    auto& q = queue(s.device_index(), s.id());
    if (q.items.empty()) {
      state->done = true;
      state->ms = now_ms();
    } else {
      state->seq = q.next++;
      q.items.push_back(Item{state->seq, nullptr, state});
    }
    slot = state;
  }
  // `stream` waits for the event: its later work runs now, on this thread, so what the event's stream
  // issued before the record must have run first
  void block(void* e, const Stream&) const override { synchronizeEvent(e); }
  bool queryEvent(void* e) const override {
    std::lock_guard<std::recursive_mutex> g(mu);
    if (e == nullptr) return true;
    auto& state = *static_cast<std::shared_ptr<EventState>*>(e);
    return !state || state->done;
  }
  void synchronizeEvent(void* e) const override {
    if (e == nullptr) return;
    std::shared_ptr<EventState> state;
    {
      std::lock_guard<std::recursive_mutex> g(mu);
      state = *static_cast<std::shared_ptr<EventState>*>(e);
    }
    if (state && !state->done) flush(state->device, state->stream, state->seq);
  }
  bool queryStream(const Stream& s) const override {
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = queues.find({s.device_index(), s.id()});
    return it == queues.end() || it->second.items.empty();
  }
  void synchronizeStream(const Stream& s) const override { flush(s.device_index(), s.id()); }
  void synchronizeDevice(const DeviceIndex d) const override { flush_device(d < 0 ? tl_device : d); }
  double elapsedTime(void* a, void* b, const DeviceIndex) const override {
    std::lock_guard<std::recursive_mutex> g(mu);
    TORCH_CHECK(a != nullptr && b != nullptr, "fake accelerator: elapsed time of an event never recorded");
    auto& x = *static_cast<std::shared_ptr<EventState>*>(a);
    auto& y = *static_cast<std::shared_ptr<EventState>*>(b);
    TORCH_CHECK(x && y && x->done && y->done, "fake accelerator: elapsed time of an event not yet complete");
    return y->ms - x->ms;
  }
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, Guard);

// ---------------------------------------------------------------------------------------------------
// hooks: what torch.accelerator and pinned memory ask of a backend

struct Hooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  void init() const override {}
  DeviceIndex deviceCount() const override { return kDevices; }
  void setCurrentDevice(DeviceIndex d) const override { tl_device = index_of(Device(kType, d)); }
  DeviceIndex getCurrentDevice() const override { return tl_device; }
  DeviceIndex exchangeDevice(DeviceIndex d) const override {
    const auto old = tl_device;
    setCurrentDevice(d);
    return old;
  }
  DeviceIndex maybeExchangeDevice(DeviceIndex d) const override { return exchangeDevice(d); }
  bool isPinnedPtr(const void* data) const override { return is_pinned_ptr(data); }
  c10::Allocator* getPinnedMemoryAllocator() const override { return &pinned_memory; }
  Device getDeviceFromPtr(void* data) const override {
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = device_memory.blocks.find(data);
    return Device(kType, it == device_memory.blocks.end() ? tl_device : it->second.first);
  }
  const at::Generator& getDefaultGenerator(DeviceIndex) const override {
    return at::detail::getDefaultCPUGenerator();  // random ops run on the CPU kernels
  }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t n) const override {
    at::native::resize_bytes_cpu(storage.unsafeGetStorageImpl(), n);
  }
};

Hooks hooks;

// ---------------------------------------------------------------------------------------------------
// kernels

constexpr c10::DispatchKeySet kKeys(c10::DispatchKey::PrivateUse1);

Device resolve(std::optional<Device> device) {
  return Device(kType, index_of(device.value_or(Device(kType, tl_device))));
}

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout>, std::optional<Device> device, std::optional<bool>,
                               std::optional<c10::MemoryFormat> memory_format) {
  c10::DeviceGuard guard(resolve(device));
  return at::detail::empty_generic(size, &device_memory, kKeys, c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<c10::ScalarType> dtype,
                         std::optional<c10::Layout>, std::optional<Device> device, std::optional<bool>) {
  c10::DeviceGuard guard(resolve(device));
  return at::detail::empty_strided_generic(size, stride, &device_memory, kKeys, c10::dtype_or_default(dtype));
}

// A CPU tensor over the same bytes as `t` (a tensor on the fake device), keeping its storage alive.
// Tensors sharing a storage share the alias's storage (`seen`), so overlap checks still see them overlap.
at::Tensor host_alias(const at::Tensor& t, std::unordered_map<c10::StorageImpl*, c10::Storage>* seen = nullptr) {
  const c10::Storage& storage = t.storage();
  c10::Storage alias;
  if (seen != nullptr) {
    auto found = seen->find(storage.unsafeGetStorageImpl());
    if (found != seen->end()) alias = found->second;
  }
  if (!alias) {
    auto* keep = new c10::Storage(storage);
    c10::DataPtr ptr(storage.mutable_data(), keep, [](void* ctx) { delete static_cast<c10::Storage*>(ctx); },
                     Device(DeviceType::CPU));
    // resizable through the CPU allocator: an op that resizes its `out=` argument does it here, and the
    // fallback then gives the device tensor the new shape and bytes
    alias = c10::Storage(c10::Storage::use_byte_size_t(), storage.nbytes(), std::move(ptr), c10::GetCPUAllocator(),
                         true);
    if (seen) (*seen)[storage.unsafeGetStorageImpl()] = alias;
  }
  auto out = at::detail::make_tensor<c10::TensorImpl>(std::move(alias), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                      t.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
  return out;
}

bool on_device(const at::Tensor& t) { return t.defined() && t.device().type() == kType; }

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  TORCH_CHECK(on_device(self) || on_device(dst), "fake accelerator: _copy_from without a device tensor");
  if (self.numel() == 0) return dst;
  const DeviceIndex d = on_device(dst) ? dst.device().index() : self.device().index();
  c10::DeviceGuard guard(Device(kType, d));
  const bool to_device = on_device(dst);
  const bool from_host = !on_device(self);
  at::Tensor src = from_host ? self : host_alias(self);
  at::Tensor out = to_device ? host_alias(dst) : dst;
  if (to_device && from_host) {
    const bool pinned = is_pinned_ptr(self.data_ptr());
    if (non_blocking && !pinned) {
      ++pageable_async;
      src = self.clone();  // a real device copies pageable memory before returning
    }
    if (non_blocking) {
      issue(d, [out, src]() mutable { out.copy_(src); });
    } else {
      flush_current(d);
      out.copy_(src);
    }
  } else if (to_device) {  // device to device: ordered on the stream, asynchronous to the host
    issue(d, [out, src]() mutable { out.copy_(src); });
  } else {  // device to host
    flush_current(d);
    out.copy_(src);
  }
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  at::native::resize_(dst, self.sizes());
  return copy_from(self, dst, false);
}

bool compatible_shallow_copy(const at::Tensor& self, const at::Tensor& from) {
  auto dense = [](const at::Tensor& t) {
    return t.layout() == c10::kStrided && !t.is_quantized() &&
           (t.device().type() == kType || t.device().type() == DeviceType::CPU);
  };
  return self.unsafeGetTensorImpl()->has_compatible_shallow_copy_type(from.key_set()) || (dense(self) && dense(from));
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage source, int64_t offset, c10::IntArrayRef size,
                        c10::IntArrayRef stride) {
  return at::native::set_storage_cpu_(self, std::move(source), offset, size, stride);
}

at::Tensor& set_source(at::Tensor& self, c10::Storage source) {
  const int64_t n = source.nbytes() / self.dtype().itemsize();
  return set_storage(self, std::move(source), 0, {n}, {});
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  return at::native::set_tensor_(self, source);
}

at::Tensor& set_empty(at::Tensor& self) {
  c10::DeviceGuard guard(self.device());
  c10::Storage storage(c10::Storage::use_byte_size_t(), 0, &device_memory, true);
  return set_storage(self, std::move(storage), 0, {0}, {});
}

const at::Tensor& resize(const at::Tensor& self, c10::IntArrayRef size, std::optional<c10::MemoryFormat> format) {
  c10::DeviceGuard guard(self.device());
  return at::native::resize_(self, size, format);
}

// CUDA's histc counts integer tensors (transformers' MoE routing counts int32 expert ids off the CPU); the
// CPU kernel takes floating point only. Counted in double (exact for 32-bit integers), returned in the
// input's dtype as CUDA does.
at::Tensor histc(const at::Tensor& self, int64_t bins, const at::Scalar& min, const at::Scalar& max) {
  c10::DeviceGuard guard(self.device());
  flush_current(self.device().index());
  at::Tensor host = host_alias(self);
  at::Tensor counts = at::histc(host.is_floating_point() ? host : host.to(at::kDouble), bins, min, max);
  at::Tensor out = empty_memory_format(counts.sizes(), self.scalar_type(), std::nullopt, self.device(), std::nullopt,
                                       std::nullopt);
  host_alias(out).copy_(counts);
  return out;
}

// Attention picks its kernel through a stub that has no entry for a backend like this one, which sends it
// to the decomposed "math" path; the CPU's choice keeps the numbers the CPU's (its kernels run here).
int64_t sdp_choice(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, double dropout, bool causal, std::optional<double> scale,
                   bool gqa) {
  std::optional<at::Tensor> host_mask;
  if (mask && mask->defined()) host_mask = on_device(*mask) ? host_alias(*mask) : *mask;
  return at::_fused_sdp_choice(host_alias(q), host_alias(k), host_alias(v), host_mask, dropout, causal, scale, gqa);
}

}  // namespace fakeaccel

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &fakeaccel::sdp_choice)
}  // namespace at::native

namespace fakeaccel {

// ---------------------------------------------------------------------------------------------------
// everything else: the CPU kernel, on the same bytes, once its tensors are known to share one device

[[noreturn]] void mismatch(const c10::OperatorHandle& op, Device a, Device b) {
  TORCH_CHECK(false, "Expected all tensors to be on the same device, but found at least two devices, ", a, " and ",
              b, "! (fake accelerator, in ", op.schema().name(), ")");
}

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& args = schema.arguments();
  const size_t n = args.size();
  const size_t first = stack->size() - n;
  const bool indexing = schema.name() == "aten::index" || schema.name() == "aten::index_put_" ||
                        schema.name() == "aten::index_put" || schema.name() == "aten::_index_put_impl_";
  std::optional<Device> device;
  std::optional<Device> host;  // a CPU tensor with dimensions, allowed only as an index
  auto see = [&](const at::Tensor& t, bool index_arg) {
    if (!t.defined()) return;
    if (t.device().type() == kType) {
      if (device && *device != t.device()) mismatch(op, *device, t.device());
      device = t.device();
    } else if (t.device().type() == DeviceType::CPU) {
      if (t.dim() > 0 && !index_arg) host = t.device();
    } else {
      host = t.device();
    }
  };
  for (size_t i = 0; i < n; ++i) {
    const auto& v = (*stack)[first + i];
    const bool index_arg = indexing && args[i].name() == "indices";
    if (v.isTensor()) {
      see(v.toTensor(), index_arg);
    } else if (v.isTensorList()) {
      for (const auto& t : v.toTensorVector()) see(t, index_arg);
    } else if (v.isList()) {
      for (const auto& e : v.toListRef())
        if (e.isTensor()) see(e.toTensor(), index_arg);
    } else if (v.isDevice() && v.toDevice().type() == kType) {
      if (!device) device = Device(kType, index_of(v.toDevice()));
    }
  }
  if (device && host) mismatch(op, *device, *host);
  const Device dev = device ? *device : Device(kType, tl_device);
  c10::DeviceGuard guard(dev);
  flush_current(dev.index());  // earlier work on this stream runs first

  std::unordered_map<c10::StorageImpl*, c10::Storage> seen;  // device storage -> its host alias
  std::vector<at::Tensor> originals(n), aliases(n);
  for (size_t i = 0; i < n; ++i) {
    auto& v = (*stack)[first + i];
    if (v.isTensor()) {
      const auto& t = v.toTensor();
      if (on_device(t)) {
        originals[i] = t;
        aliases[i] = host_alias(t, &seen);
        v = aliases[i];
      }
    } else if (v.isTensorList()) {
      auto list = v.toTensorVector();
      for (auto& t : list)
        if (on_device(t)) t = host_alias(t, &seen);
      v = c10::IValue(c10::List<at::Tensor>(list));
    } else if (v.isList()) {
      const auto& list = v.toListRef();
      bool optional_tensors = false;
      for (const auto& e : list) optional_tensors |= e.isTensor();
      if (optional_tensors) {
        c10::List<std::optional<at::Tensor>> out;
        for (const auto& e : list) {
          if (e.isTensor() && on_device(e.toTensor())) {
            out.push_back(host_alias(e.toTensor(), &seen));
          } else if (e.isTensor()) {
            out.push_back(e.toTensor());
          } else {
            out.push_back(std::nullopt);
          }
        }
        v = c10::IValue(out);
      }
    } else if (v.isDevice() && v.toDevice().type() == kType) {
      v = c10::IValue(Device(DeviceType::CPU));
    }
  }
  std::unordered_map<c10::StorageImpl*, c10::Storage> back;  // host alias -> the device storage
  for (auto& [impl, alias] : seen) back[alias.unsafeGetStorageImpl()] = c10::Storage(c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(impl));

  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);

  // arguments written in place that the CPU kernel resized or restrided (`out=`): the same on the device
  for (size_t i = 0; i < n; ++i) {
    const auto* a = args[i].alias_info();
    if (!a || !a->isWrite() || !originals[i].defined()) continue;
    const at::Tensor& host = aliases[i];
    at::Tensor& dev_t = originals[i];
    const bool moved = host.storage().data() != dev_t.storage().data();
    if (!moved && host.sizes() == dev_t.sizes() && host.strides() == dev_t.strides() &&
        host.storage_offset() == dev_t.storage_offset())
      continue;
    c10::Storage storage = dev_t.storage();
    if (moved) {
      storage = c10::Storage(c10::Storage::use_byte_size_t(), host.storage().nbytes(), &device_memory, true);
      std::memcpy(storage.mutable_data(), host.storage().data(), host.storage().nbytes());
    }
    set_storage(dev_t, storage, host.storage_offset(), host.sizes(), host.strides());
    if (moved) back[host.storage().unsafeGetStorageImpl()] = storage;
  }

  auto to_device = [&](const at::Tensor& t) -> at::Tensor {
    if (!t.defined() || t.device().type() != DeviceType::CPU) return t;
    auto it = t.has_storage() ? back.find(t.storage().unsafeGetStorageImpl()) : back.end();
    if (it != back.end()) {  // a view of a device tensor's bytes
      auto view = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(it->second), kKeys, t.dtype());
      view.unsafeGetTensorImpl()->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
      return view;
    }
    at::Tensor out = t.is_non_overlapping_and_dense()
                         ? empty_strided(t.sizes(), t.strides(), t.scalar_type(), std::nullopt, dev, std::nullopt)
                         : empty_memory_format(t.sizes(), t.scalar_type(), std::nullopt, dev, std::nullopt,
                                               std::nullopt);
    host_alias(out).copy_(t);
    return out;
  };
  const auto& returns = schema.returns();
  const size_t r = returns.size();
  const size_t rfirst = stack->size() - r;
  for (size_t j = 0; j < r; ++j) {
    auto& v = (*stack)[rfirst + j];
    const auto* alias = returns[j].alias_info();
    if (alias && alias->isWrite() && v.isTensor()) {  // an argument written in place: give it back itself
      for (size_t i = 0; i < n; ++i) {
        const auto* a = args[i].alias_info();
        if (a && a->isWrite() && a->beforeSets() == alias->beforeSets() && originals[i].defined()) {
          v = c10::IValue(originals[i]);
          break;
        }
      }
    }
    if (v.isTensor()) {
      v = c10::IValue(to_device(v.toTensor()));
    } else if (v.isTensorList()) {
      auto list = v.toTensorVector();
      for (auto& t : list) t = to_device(t);
      v = c10::IValue(c10::List<at::Tensor>(list));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// the Python side's handles: torch.ops.fakeaccel.*

void set_mode(c10::string_view mode) {
  TORCH_CHECK(mode == "sync" || mode == "deferred", "fake accelerator: mode is 'sync' or 'deferred', not '",
              std::string(mode), "'");
  flush_all();
  deferred = mode == "deferred";
}

std::string get_mode() { return deferred ? "deferred" : "sync"; }

void set_capacity(int64_t device, int64_t bytes) {
  std::lock_guard<std::recursive_mutex> g(mu);
  device_memory.capacity.at(index_of(Device(kType, DeviceIndex(device)))) = size_t(bytes);
}

std::vector<int64_t> counters() { return {pageable_async.load(), queued.load(), ran.load(), flushes.load()}; }

void reset_counters() {
  pageable_async = 0;
  queued = 0;
  ran = 0;
  flushes = 0;
}

int64_t pending() {
  std::lock_guard<std::recursive_mutex> g(mu);
  int64_t total = 0;
  for (auto& [key, q] : queues)
    for (auto& item : q.items) total += item.run ? 1 : 0;
  return total;
}

void synchronize_all() { flush_all(); }

struct Register {
  Register() {
    at::RegisterPrivateUse1HooksInterface(&hooks);
    c10::SetAllocator(kType, &device_memory);
  }
};
Register register_hooks;

}  // namespace fakeaccel

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  using namespace fakeaccel;
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("as_strided", at::native::as_strided_tensorimpl);
  m.impl("view", at::native::view);
  m.impl("_reshape_alias", at::native::_reshape_alias);
  m.impl("resize_", resize);
  m.impl("set_.source_Storage", set_source);
  m.impl("set_.source_Storage_storage_offset", set_storage);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("set_", set_empty);
  m.impl("_has_compatible_shallow_copy_type", compatible_shallow_copy);
  m.impl("histc", histc);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fakeaccel::fallback>());
}

TORCH_LIBRARY(fakeaccel, m) {
  m.def("set_mode(str mode) -> ()", fakeaccel::set_mode);
  m.def("mode() -> str", fakeaccel::get_mode);
  m.def("set_capacity(int device, int bytes) -> ()", fakeaccel::set_capacity);
  m.def("counters() -> int[]", fakeaccel::counters);
  m.def("reset_counters() -> ()", fakeaccel::reset_counters);
  m.def("pending() -> int", fakeaccel::pending);
  m.def("synchronize_all() -> ()", fakeaccel::synchronize_all);
  m.def("device_count() -> int", []() -> int64_t { return fakeaccel::kDevices; });
}
