// A fresh directory under $TMPDIR (or /tmp), removed with its contents when
// the object goes away. For tests that need a real RocksDB.
#ifndef KVMEM_TESTS_TEMP_DIR_H_
#define KVMEM_TESTS_TEMP_DIR_H_

#include <cstdlib>
#include <filesystem>
#include <string>

namespace kvmem::testing {

class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern =
        std::string(base != nullptr ? base : "/tmp") + "/kvmem-test-XXXXXX";
    path_ = mkdtemp(pattern.data()) != nullptr ? pattern : "";
  }
  ~TempDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // Empty if the directory could not be made (tests assert on it).
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace kvmem::testing

#endif  // KVMEM_TESTS_TEMP_DIR_H_
