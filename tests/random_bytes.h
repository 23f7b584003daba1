// `n` random bytes from `rng`: tensors and junk for the wire tests.
#ifndef KVMEM_TESTS_RANDOM_BYTES_H_
#define KVMEM_TESTS_RANDOM_BYTES_H_

#include <random>
#include <string>

namespace kvmem::testing {

inline std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = char(rng());
  return s;
}

}  // namespace kvmem::testing

#endif  // KVMEM_TESTS_RANDOM_BYTES_H_
