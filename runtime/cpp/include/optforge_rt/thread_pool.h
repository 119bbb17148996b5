// A fixed pool of worker threads running `parallel_for` over index ranges. The range is cut into a few
// chunks per thread that the caller and the workers claim from a shared ticket, so a worker the OS has not
// scheduled yet (a busy, shared machine) never holds the caller up: the caller takes its chunks instead.
// Workers spin briefly before sleeping so the ~250 small jobs of one decode step stay cheap.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace optforge_rt {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // total threads including the caller; <= 0 means hardware count
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }
  // Runs fn(begin, end) over [0, n) split into contiguous chunks, one per thread; returns when all are done.
  void parallel_for(int n, const std::function<void(int, int)>& fn);

 private:
  void worker_loop();
  void run_chunks(uint64_t generation);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> ticket_{0};  // (generation << 32) | next chunk index
  std::atomic<int> num_done_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int, int)>* job_ = nullptr;
  int job_size_ = 0;
  int num_chunks_ = 0;
};

}  // namespace optforge_rt
