# The two commands of the README, and CI's sanitizer run. CMake does the
# real work (CMakePresets.json); this file only orders the steps.
JOBS ?= 2
ARGS ?=

.PHONY: deps build run test build-asan test-asan test-tsan format-check thread-safety-check clean

deps:
	@scripts/install-deps.sh

build: deps
	@test -f build/release/build.ninja || cmake --preset release
	cmake --build --preset release -j $(JOBS)
	@ln -sf build/release/compile_commands.json compile_commands.json

# Starts the server on the embedded defaults (127.0.0.1:50051, ./kvmem-data,
# backend auto); ARGS="--listen=0.0.0.0:50051 ..." adds flags.
run: build
	./build/release/service/kvmem-server $(ARGS)

test: build
	ctest --preset release -j $(JOBS)

build-asan: deps
	@test -f build/asan/build.ninja || cmake --preset asan
	cmake --build --preset asan -j $(JOBS)

# Every test under AddressSanitizer + UndefinedBehaviorSanitizer.
test-asan: build-asan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	ctest --preset asan -j $(JOBS)

# The engine, storage and CPU-kernel tests under ThreadSanitizer. gRPC tests
# are left out: Debian's gRPC is not TSan-instrumented and reports false
# races on correct code.
test-tsan: deps
	@test -f build/tsan/build.ninja || cmake --preset tsan
	cmake --build --preset tsan -j $(JOBS) --target kvmem_engine_tests \
	  kvmem_storage_tests kvmem_kernels_tests
	TSAN_OPTIONS=ignore_noninstrumented_modules=1:halt_on_error=1 \
	  sh -c './build/tsan/tests/service/kvmem_engine_tests && \
	  ./build/tsan/tests/storage/kvmem_storage_tests && \
	  ./build/tsan/tests/kernels/kvmem_kernels_tests' > build/tsan/tests.log 2>&1 \
	  || (tail -60 build/tsan/tests.log; exit 1)
	@grep -c "OK \]" build/tsan/tests.log | xargs echo "tsan: tests passed:"

format-check:
	clang-format-14 --dry-run --Werror $$(git ls-files '*.h' '*.cc' '*.cu')

clean:
	rm -rf build compile_commands.json

# Clang's lock analysis (kvmem::Mutex annotations) over the code that locks.
thread-safety-check: build
	@for f in $$(git ls-files 'service/*.cc' 'storage/*.cc' 'client/cpp/*.cc'); do \
	  clang++-14 -std=c++17 -fsyntax-only -Wthread-safety -Werror -I. \
	    -Ibuild/release/proto -I/usr/local/cuda/include $$f || exit 1; \
	done; echo "thread-safety: clean"
