// Which of a stream's spilled tokens its device spill ring holds
// (DeviceBackend::Options::spill_ring_tokens): the host's bookkeeping of a
// ring the device writes (cuda::KeepEvictedInRings) and reads
// (cuda::MapSelectedRows), in one place so that it is tested on any
// machine (tests/service/engine/spill_ring_test.cc).
//
// A stream's spilled tokens are numbered in spill order from 0; page p
// holds tokens p·P … p·P + P − 1 (the last page, the open one, fewer). The
// ring keeps token n at index n mod size, so it holds at most the last
// `size` of them, and only those spilled through it (by decode steps and
// chunks on the device): a token spilled another way (a host-path step
// while the layer was not device-owned) moves the stream's count past
// `end`, and since counts only grow, Sync then finds the ring stale.
#ifndef KVMEM_SERVICE_ENGINE_SPILL_RING_H_
#define KVMEM_SERVICE_ENGINE_SPILL_RING_H_

#include <algorithm>
#include <cstdint>

namespace kvmem {

struct SpillRing {
  static constexpr int32_t kNoPage = INT32_MAX;

  int size = 0;  // tokens, a multiple of the page; 0: no ring
  // It holds the rows of tokens [begin, end) that are among the last
  // `size`; end is the stream's count after the last step kept its
  // evicted token here (−1: never synced).
  int64_t begin = -1, end = -1;

  // Before a step, with the stream's spilled-token count.
  void Sync(int64_t spilled) {
    if (end != spilled) begin = end = spilled;  // stale: empty from here
  }
  // The first of the stream's pages whose tokens the ring holds, all of
  // them; kNoPage without a ring, or when not synced to `spilled`.
  int32_t FirstPage(int64_t spilled, int page_tokens) const {
    if (size <= 0 || end != spilled) return kNoPage;
    const int64_t from = std::max(begin, spilled - size);
    return int32_t((from + page_tokens - 1) / page_tokens);
  }
  // Where token n lies, or goes: −1 without a ring.
  int32_t Index(int64_t n) const { return size <= 0 ? -1 : int32_t(n % size); }
  // After a step from `spilled` whose `evicted` tokens (a decode step's
  // one or none, a chunk's up to T) were kept here, the last `size` of
  // them at Index(spilled + e).
  void Kept(int64_t spilled, int64_t evicted) {
    if (size > 0) end = spilled + evicted;
  }
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_SPILL_RING_H_
