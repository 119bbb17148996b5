#include "optforge_rt/thread_pool.h"

#include <immintrin.h>

namespace optforge_rt {

namespace {
constexpr int kSpinIterations = 20000;  // about 50 us of polling before a thread sleeps or yields
constexpr int kChunksPerThread = 4;
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

// Claims chunks of job `generation` until none is left. The generation in the ticket guarantees that a
// late worker never runs a chunk of a job that has already returned.
void ThreadPool::run_chunks(uint64_t generation) {
  while (true) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    uint64_t index = t & 0xFFFFFFFFu;
    if ((t >> 32) != (generation & 0xFFFFFFFFu) || index >= static_cast<uint64_t>(num_chunks_)) return;
    if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
    int chunk = (job_size_ + num_chunks_ - 1) / num_chunks_;
    int begin = std::min(job_size_, static_cast<int>(index) * chunk), end = std::min(job_size_, begin + chunk);
    if (begin < end) (*job_)(begin, end);
    num_done_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int n, const std::function<void(int, int)>& fn) {
  if (workers_.empty() || n < 2) {
    if (n > 0) fn(0, n);
    return;
  }
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = &fn;
    job_size_ = n;
    num_chunks_ = std::min(n, num_threads() * kChunksPerThread);
    num_done_.store(0);
    generation = generation_.fetch_add(1) + 1;
    ticket_.store((generation & 0xFFFFFFFFu) << 32, std::memory_order_release);
  }
  wake_.notify_all();
  run_chunks(generation);
  for (int spins = 0; num_done_.load(std::memory_order_acquire) != num_chunks_; ++spins) {
    if (spins < kSpinIterations) _mm_pause(); else std::this_thread::yield();
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  while (true) {
    for (int spins = 0; generation_.load(std::memory_order_acquire) == seen && spins < kSpinIterations; ++spins) _mm_pause();
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
    }
    uint64_t generation;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stop_) return;
      generation = seen = generation_.load();
    }
    run_chunks(generation);
  }
}

}  // namespace optforge_rt
