// Static work split for the packer: contiguous item ranges of about equal weight, one std::thread each (the calling
// thread runs the last range). Items write disjoint outputs, so the result does not depend on the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace packer {

inline std::atomic<int>& thread_setting() {
  static std::atomic<int> threads{static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))};
  return threads;
}

// Bytes of work per thread below which adding a thread costs more than it saves.
constexpr int64_t kMinBytesPerThread = int64_t(4) << 20;

// Calls fn(begin, end) on ranges covering [0, n); weight(k) >= 0 is item k's share of `total_bytes` of work.
template <class W, class F>
void parallel_ranges(int64_t n, int64_t total_bytes, W&& weight, F&& fn) {
  const int64_t threads = std::min<int64_t>({thread_setting().load(), n, total_bytes / kMinBytesPerThread});
  if (threads <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<int64_t> cum(n + 1, 0);
  for (int64_t k = 0; k < n; ++k) cum[k + 1] = cum[k] + weight(k) + 1;
  std::vector<std::thread> pool;
  int64_t begin = 0;
  for (int64_t p = 1; p <= threads; ++p) {
    const int64_t target = cum[n] * p / threads;
    const int64_t end = p == threads ? n : std::lower_bound(cum.begin(), cum.end(), target) - cum.begin();
    if (end <= begin) continue;
    if (p == threads) fn(begin, end);
    else pool.emplace_back(fn, begin, end);
    begin = end;
  }
  for (auto& t : pool) t.join();
}

}  // namespace packer
