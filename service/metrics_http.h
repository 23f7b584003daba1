// A minimal HTTP/1.1 endpoint for Prometheus scrapes: `GET /metrics`
// answers the text that `render` returns; anything else gets 404 (or 405
// for other methods). One connection at a time, each closed after its
// reply: a scrape endpoint, not a web server.
// Thread-safe; `render` is called from the server's own thread.
#ifndef KVMEM_SERVICE_METRICS_HTTP_H_
#define KVMEM_SERVICE_METRICS_HTTP_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace kvmem {

class MetricsHttpServer {
 public:
  // Listens on `listen` ("host:port", port 0 picks one). INVALID_ARGUMENT
  // for a malformed address; UNAVAILABLE when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& listen, std::function<std::string()> render);
  // Stops serving and joins the thread.
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }

 private:
  MetricsHttpServer(int listen_fd, int wake_read, int wake_write, int port,
                    std::function<std::string()> render);
  void Loop();
  void Serve(int fd);

  const int listen_fd_;
  const int wake_read_;   // Loop polls it; the destructor writes to
  const int wake_write_;  // wake_write_ to stop it
  const int port_;
  const std::function<std::string()> render_;
  std::thread thread_;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_METRICS_HTTP_H_
