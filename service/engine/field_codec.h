// Little-endian fields for the engine's stored records (manifests, stream
// checkpoints, the step log, kept steps): raw fixed-size values, and
// byte strings and vectors prefixed by a u64 length. x86 and the GPU
// machine are little-endian, so values are copied as they lie in memory.
#ifndef KVMEM_SERVICE_ENGINE_FIELD_CODEC_H_
#define KVMEM_SERVICE_ENGINE_FIELD_CODEC_H_

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/strings/string_view.h"

namespace kvmem {

class FieldWriter {
 public:
  template <typename T>
  void Put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void PutBytes(absl::string_view bytes) {
    Put<uint64_t>(bytes.size());
    out_.append(bytes.data(), bytes.size());
  }
  template <typename T>
  void PutVector(const std::vector<T>& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    Put<uint64_t>(v.size());
    out_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  }
  // Room for `bytes` more, when the caller knows the size: a record of
  // large fields is then written with no reallocation and copy.
  void Reserve(size_t bytes) { out_.reserve(out_.size() + bytes); }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

// Each Get returns false, reading nothing further, when the input is short.
class FieldReader {
 public:
  explicit FieldReader(absl::string_view in) : in_(in) {}
  template <typename T>
  bool Get(T* v) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (in_.size() - at_ < sizeof(T)) return false;
    memcpy(v, in_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return true;
  }
  bool GetBytes(std::string* bytes) {
    uint64_t n;
    if (!Get(&n) || n > in_.size() - at_) return false;
    bytes->assign(in_.data() + at_, size_t(n));
    at_ += size_t(n);
    return true;
  }
  // Also false when the vector would hold more than `max_elems`.
  template <typename T>
  bool GetVector(std::vector<T>* v,
                 uint64_t max_elems = std::numeric_limits<uint64_t>::max()) {
    static_assert(std::is_trivially_copyable_v<T>);
    uint64_t n;
    if (!Get(&n) || n > max_elems || (in_.size() - at_) / sizeof(T) < n) {
      return false;
    }
    v->resize(n);
    if (n > 0) memcpy(v->data(), in_.data() + at_, n * sizeof(T));
    at_ += n * sizeof(T);
    return true;
  }
  bool Done() const { return at_ == in_.size(); }

 private:
  absl::string_view in_;
  size_t at_ = 0;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_FIELD_CODEC_H_
