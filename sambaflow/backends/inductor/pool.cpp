// The memory pool of compiled CPU programs (built and loaded by pool.py beside this file).
//
// A CPU allocator put in front of torch's own. Allocations of at least `min_bytes` made on a
// thread inside a program run (between sambaflow_pool_enter and _exit) come from memory the pool
// keeps mapped after it is freed, so the next step does not fault its pages in again (on a 2-core
// machine the kernel's page faults were a third of a GPT-2 step). Blocks are carved best-fit from
// segments, split, and merged with free neighbours when freed, so a step's differently sized
// buffers share memory as they would in a fresh heap; on a miss the wholly free segments are
// released first, so the pool adds no peak over torch's own allocator. Everything else goes to
// the allocator that was installed before, and blocks may be freed on any thread, at any time.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

namespace {

constexpr std::size_t kPage = 4096;

struct Block {
  char* base;
  std::size_t size;
  bool free;
  Block* prev;  // neighbours in the same segment, by address
  Block* next;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
struct Pool {
  std::mutex mutex;
  std::set<std::pair<std::size_t, Block*>> free_blocks;  // by size, then address of the Block
  std::unordered_map<void*, Block*> lent;
  std::size_t min_bytes = std::size_t(1) << 20;
  std::size_t max_cached = std::size_t(1) << 31;
  std::size_t segment_bytes = 0;  // all memory the pool holds
  std::size_t cached_bytes = 0;   // of which free
  std::size_t hits = 0;
  std::size_t misses = 0;
  c10::Allocator* fallback = nullptr;
};
Pool& pool = *new Pool;
thread_local int active_depth = 0;

void take_free(Block* block) { pool.free_blocks.erase({block->size, block}); pool.cached_bytes -= block->size; }
void put_free(Block* block) { pool.free_blocks.insert({block->size, block}); pool.cached_bytes += block->size; }

// Split `block` (not in the free set) to `size`; the rest becomes a free block.
void split(Block* block, std::size_t size) {
  if (block->size - size < pool.min_bytes) return;
  Block* rest = new Block{block->base + size, block->size - size, true, block, block->next};
  if (block->next != nullptr) block->next->prev = rest;
  block->next = rest;
  block->size = size;
  put_free(rest);
}

// Give whole free segments back to the system until the free memory is within the cap.
void trim(std::size_t keep) {
  for (auto it = pool.free_blocks.begin(); pool.cached_bytes > keep && it != pool.free_blocks.end();) {
    Block* block = it->second;
    ++it;
    if (block->prev == nullptr && block->next == nullptr) {
      take_free(block);
      pool.segment_bytes -= block->size;
      c10::free_cpu(block->base);
      delete block;
    }
  }
}

// Join `right`, the next block of `left` in their segment, into `left` (neither in the free set).
Block* merge(Block* left, Block* right) {
  left->size += right->size;
  left->next = right->next;
  if (right->next != nullptr) right->next->prev = left;
  delete right;
  return left;
}

void give_back(void* ptr) {
  std::lock_guard<std::mutex> lock(pool.mutex);
  auto found = pool.lent.find(ptr);
  Block* block = found->second;
  pool.lent.erase(found);
  block->free = true;
  if (block->next != nullptr && block->next->free) {
    take_free(block->next);
    merge(block, block->next);
  }
  if (block->prev != nullptr && block->prev->free) {
    take_free(block->prev);
    block = merge(block->prev, block);
  }
  put_free(block);
  trim(pool.max_cached);
}

bool is_lent(void* ptr) {
  std::lock_guard<std::mutex> lock(pool.mutex);
  return pool.lent.count(ptr) != 0;
}

void raw_delete(void* ptr) {
  if (is_lent(ptr)) {
    give_back(ptr);
  } else {
    pool.fallback->raw_deleter()(ptr);
  }
}

void* pooled(std::size_t nbytes) {
  std::size_t size = (nbytes + kPage - 1) / kPage * kPage;
  std::lock_guard<std::mutex> lock(pool.mutex);
  Block* block = nullptr;
  auto fit = pool.free_blocks.lower_bound({size, nullptr});
  if (fit != pool.free_blocks.end()) {
    block = fit->second;
    take_free(block);
    split(block, size);
    ++pool.hits;
  } else {
    // A miss: free segments that cannot serve it would only add to this step's peak.
    trim(0);
    block = new Block{static_cast<char*>(c10::alloc_cpu(size)), size, false, nullptr, nullptr};
    pool.segment_bytes += size;
    ++pool.misses;
  }
  block->free = false;
  pool.lent[block->base] = block;
  return block->base;
}

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(std::size_t nbytes) override {
    if (active_depth == 0 || nbytes < pool.min_bytes) return pool.fallback->allocate(nbytes);
    void* ptr = pooled(nbytes);
    return {ptr, ptr, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &raw_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
PoolAllocator& allocator = *new PoolAllocator;

void lock_for_fork() { pool.mutex.lock(); }
void unlock_after_fork() { pool.mutex.unlock(); }

}  // namespace

extern "C" {
// Put the pool in front of the current CPU allocator (once); returns 1 when it is in front.
int sambaflow_pool_install(std::size_t min_bytes, std::size_t max_cached) {
  std::lock_guard<std::mutex> lock(pool.mutex);
  pool.min_bytes = min_bytes < kPage ? kPage : min_bytes;
  pool.max_cached = max_cached;
  if (pool.fallback == nullptr) {
    pool.fallback = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&allocator, /*priority=*/UINT8_MAX);
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
  }
  return c10::GetCPUAllocator() == &allocator;
}
void sambaflow_pool_enter() { ++active_depth; }
void sambaflow_pool_exit() { --active_depth; }
// Free every whole free segment; returns the bytes the pool still holds.
std::size_t sambaflow_pool_release() {
  std::lock_guard<std::mutex> lock(pool.mutex);
  trim(0);
  return pool.segment_bytes;
}
// segment bytes, free bytes, lent blocks, hits, misses
void sambaflow_pool_stats(std::size_t* out) {
  std::lock_guard<std::mutex> lock(pool.mutex);
  out[0] = pool.segment_bytes;
  out[1] = pool.cached_bytes;
  out[2] = pool.lent.size();
  out[3] = pool.hits;
  out[4] = pool.misses;
}
}
